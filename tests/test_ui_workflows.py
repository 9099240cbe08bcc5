"""What a user meets in ComfyUI: templates that pick no video, plan before they encode, never cap in silence, and
legends that can be read where they are shown."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_visionzip.viz import LEGENDS, text_scale, with_legend

REPO = Path(__file__).resolve().parents[1]
UI = sorted((REPO / "workflows").glob("*.json"))
API = sorted((REPO / "workflows" / "api").glob("*_api.json"))
ENCODERS = ("VisionZipVideoToTokens", "VisionZipEncodeFrames")
ASKERS = ("VisionZipAnswer", "VisionZipChat")


def _runner():
    spec = importlib.util.spec_from_file_location("run_headless_ui", REPO / "workflows" / "run_headless.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source(prompt: dict, node_id: str, name: str) -> tuple[str, dict] | None:
    """(id, node) of what feeds input ``name`` of node ``node_id``, or None when it is a value."""
    value = prompt[node_id]["inputs"].get(name)
    return (value[0], prompt[value[0]]) if isinstance(value, list) else None


def _downstream(prompt: dict, node_id: str) -> list[str]:
    """Every node that depends on ``node_id``."""
    found, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        for other, node in prompt.items():
            if other not in found and any(isinstance(v, list) and v[0] == current for v in node["inputs"].values()):
                found.add(other)
                todo.append(other)
    return sorted(found, key=int)


# --- templates never pick a video -----------------------------------------------------------------------------------

def test_load_video_lists_the_empty_entry_first(pack):
    # ComfyUI's upload widget (frontend 1.27.10) keeps a loaded empty value only when it is the list's first entry
    # (the default); otherwise it shows and sends the first file of input/
    choices = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"].INPUT_TYPES()["required"]["video"][0]
    assert choices[0] == "" and choices.count("") == 1


@pytest.mark.parametrize("ui", UI, ids=lambda p: p.stem)
def test_templates_leave_the_video_to_the_user(ui):
    workflow = json.loads(ui.read_text())
    for node in workflow["nodes"]:
        if node["type"] == "VisionZipLoadVideo":
            assert node["widgets_values"][0] == "", ui.name  # 'video' is its first widget
        if node["type"] == "LoadVideo":  # core: an empty value would become the first file; a name that is no file
            assert node["widgets_values"][0] and "." in node["widgets_values"][0]
            assert not (REPO / "workflows" / node["widgets_values"][0]).exists()


@pytest.mark.parametrize("ui", UI, ids=lambda p: p.stem)
def test_templates_carry_a_short_description_for_the_templates_browser(ui):
    info = json.loads(ui.read_text())["extra"]["visionzip"]
    assert info["title"] and 20 <= len(info["description"]) <= 80  # two lines of a template card
    assert info["description"].replace(" ", "_").lower() != ui.stem


# --- plan before encoding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", API, ids=lambda p: p.stem)
def test_workflows_that_answer_plan_before_they_encode(api):
    prompt = json.loads(api.read_text())
    for node_id, node in prompt.items():
        if node["class_type"] == "VisionZipLoadVideo":
            assert node["inputs"]["max_frames"] == 0, "Frame Budget decides how many frames: no cap before it"
        if node["class_type"] not in ENCODERS:
            continue
        answers = [i for i in _downstream(prompt, node_id) if prompt[i]["class_type"] == "VisionZipAnswer"]
        if not answers:
            continue
        assert "images" not in node["inputs"] or _source(prompt, node_id, "images")[1]["class_type"] != \
            "VisionZipLoadVideo", "frames from a video go through Frame Budget, not as a preview batch"
        video = _source(prompt, node_id, "video")
        if video is None:
            continue  # an image batch of its own (interop's Load Image)
        budget_id, budget = video
        assert budget["class_type"] == "VisionZipFrameBudget", f"{api.name}: node {node_id} encodes an unplanned video"
        assert budget["inputs"]["token_budget"] == 0 and isinstance(budget["inputs"].get("model"), list)
        for answer_id in answers:  # the budget counts the prompt the Answer will prefill
            answer = prompt[answer_id]["inputs"]
            assert budget["inputs"]["question"] == answer["question"]
            assert budget["inputs"]["max_new_tokens"] == answer["max_new_tokens"]
            assert budget["inputs"]["reserved"] == answer["follow_up_reserve"]


def test_long_video_qa_prefills_exactly_what_frame_budget_planned(tiny_model_dir, clip_factory, tmp_path):
    """90 frames x 64 tokens do not fit the tiny model's 4096: Frame Budget thins before anything is encoded, so Video
    to Tokens encodes only what the Answer keeps and the Answer prefills the planned prompt, thinning nothing."""
    prompt = json.loads((REPO / "workflows" / "api" / "long_video_qa_api.json").read_text())
    clip = clip_factory("ui_long.mkv", frames=90, options={"g": "30"})
    overrides = {"1.path": clip, "1.fps": 30.0, "1.max_size": 128, "2.path": tiny_model_dir("llava"),
                 "4.max_new_tokens": 4, "5.max_new_tokens": 4, "8.max_new_tokens": 4}
    out = _runner().run(prompt, out=tmp_path / "out", overrides=overrides, log=lambda _line: None)
    budget, tokens, answer = (out["ui"][i]["text"][0] for i in ("8", "3", "4"))
    planned = int(re.match(r"(\d+) frames x 64 tokens", budget).group(1))
    assert planned < 90 and f"so {planned} of the 90 asked frames are kept" in budget
    assert tokens.startswith(f"{planned} frames of ")
    prefilled = re.search(r"prefilled (\d+)", answer).group(1)
    assert f"prompt {prefilled} + answer 4 + follow-ups 384" in budget
    assert "kept" not in answer.split("]")[0]  # the Answer thinned nothing


# --- nothing caps in silence -----------------------------------------------------------------------------------------

@pytest.fixture
def handle(pack, clip_factory):
    def make(max_frames: int):
        path = clip_factory("ui_cap.mp4", frames=60)  # 2 s at 30 fps
        return pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]().load(
            video="", mode="every", num_frames=1, fps=1.0, every=2, start=0.0, end=0.0, max_frames=max_frames,
            max_size=64, preview_frames=1, backend="auto", path=path)[2]
    return make


def test_load_videos_cap_is_said_where_the_plan_is_used(pack, handle, tiny_model_dir):
    nodes = pack.NODE_CLASS_MAPPINGS
    note = "capped at 8 of 30 planned frames by Load Video's max_frames"
    arithmetic = nodes["VisionZipFrameBudget"]().plan(token_budget=4096, tokens_per_frame=64, video=handle(8))
    assert note in arithmetic["ui"]["text"][0] and arithmetic["result"][0] == 64
    thinned = nodes["VisionZipFrameBudget"]().plan(token_budget=300, tokens_per_frame=64, video=handle(0))
    assert "the video's 30 planned frames thinned evenly to 4" in thinned["ui"]["text"][0]
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="float32", device="cpu", quantization="none",
                                             attention="sdpa", keep_loaded=True, path=tiny_model_dir("llava"))[0]
    planned = nodes["VisionZipFrameBudget"]().plan(token_budget=0, tokens_per_frame=64, model=model, video=handle(8),
                                                   question="What happens?", max_new_tokens=4)
    summary = planned["ui"]["text"][0]
    assert summary.startswith("8 frames x 64 tokens") and summary.endswith(note)
    straight = nodes["VisionZipVideoToTokens"]().run(model=model, video=handle(8), method="visionzip", dominant=9,
                                                     contextual=3, tokens_per_frame=0, batch_size=4)
    assert straight["result"][1].startswith("8 frames of ") and straight["result"][1].endswith(note)
    assert straight["ui"]["text"] == [straight["result"][1]]
    own = nodes["VisionZipFrameBudget"]().plan(token_budget=0, tokens_per_frame=64, max_frames=5, model=model,
                                               video=handle(0), question="What happens?", max_new_tokens=4)
    assert own["ui"]["text"][0].endswith("capped at 5 of 30 planned frames by max_frames")
    encoded = nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=4, video=handle(8))
    assert encoded["ui"]["text"] == [f"8 frames encoded; {note}"]
    # nothing cut, nothing said; Frame Budget's picks were said by Frame Budget
    for video in (handle(0), handle(30), planned["result"][2]):
        summary = nodes["VisionZipVideoToTokens"]().run(model=model, video=video, method="visionzip", dominant=9,
                                                        contextual=3, tokens_per_frame=0, batch_size=4)["result"][1]
        assert "capped" not in summary
    assert nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=4, video=handle(0))[0] is not None


# --- relative paths start where ComfyUI looks -----------------------------------------------------------------------

def test_a_missing_relative_path_says_where_it_was_looked_for(pack, monkeypatch, tmp_path):
    load = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]().load
    kwargs = dict(video="", mode="num_frames", num_frames=4, fps=1.0, every=1, start=0.0, end=0.0, max_frames=0,
                  max_size=0, preview_frames=1, backend="auto")
    with pytest.raises(ValueError, match=r"gone\.mp4: file not found \(relative paths start from the current folder\)"):
        load(path="sub/gone.mp4", **kwargs)  # the headless runner, the Python API: the current folder
    folder_paths = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path),
                                         get_annotated_filepath=lambda name: str(tmp_path / name))
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)  # inside ComfyUI
    with pytest.raises(ValueError) as refused:
        load(path="sub/gone.mp4", **kwargs)
    message = str(refused.value)
    assert message.startswith(str(tmp_path / "sub" / "gone.mp4") + ": file not found")
    assert "relative paths start from ComfyUI's input folder" in message and "\n" not in message
    with pytest.raises(ValueError) as absolute:
        load(path=str(tmp_path / "gone.mp4"), **kwargs)
    assert "relative paths" not in str(absolute.value)
    tooltip = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"].INPUT_TYPES()["optional"]["path"][1]["tooltip"]
    assert "relative to ComfyUI's input folder" in tooltip


# --- legends that can be read ----------------------------------------------------------------------------------------

def _text_rows(band: np.ndarray) -> list[int]:
    """Heights of the runs of rows holding light (text) pixels in a legend band."""
    lit = (band.min(axis=2) > 150).any(axis=1)
    runs, height = [], 0
    for row in lit:
        if row:
            height += 1
        elif height:
            runs.append(height)
            height = 0
    return runs + ([height] if height else [])


@pytest.mark.parametrize("width", [336, 672])
def test_legend_text_grows_with_the_picture_and_fits_it(width):
    pictures = np.zeros((1, width, width, 3), np.uint8)
    for kind in LEGENDS:
        band = with_legend(pictures, kind)[0, width:]
        if kind in ("attention", "patch"):
            band = band[12 * text_scale(width):]  # below the colour scale
        lines = _text_rows(band)
        assert len(lines) >= 2 and max(lines) >= 7 * text_scale(width), (kind, lines)
        assert not (band[:, -2:].min(axis=2) > 150).any()  # wrapped inside the picture, nothing cut at the edge
    assert text_scale(336) == 2 and text_scale(672) == 3 and text_scale(64) == 1


def test_the_heatmap_node_says_its_legends(pack, tiny_model_dir):
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="float32", device="cpu", quantization="none",
                                             attention="sdpa", keep_loaded=True, path=tiny_model_dir("llava"))[0]
    images = torch.rand(2, 40, 64, 3)
    features = nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=2, images=images)[0]
    tokens = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=9, contextual=3,
                                                   tokens_per_frame=0)["result"][0]
    out = nodes["VisionZipAttentionHeatmap"]().draw(tokens=tokens, images=images)
    assert out["ui"]["text"] == [f"attention: {LEGENDS['attention']}\nkept_tokens: {LEGENDS['tokens']}"]
    heat, kept = out["result"]
    assert heat.shape[0] == kept.shape[0] == 2 and heat.shape[2] == 336
