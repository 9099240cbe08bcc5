"""The saved workflows: UI files consistent with the nodes, API files run headless end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

from comfy_visionzip.testing.tiny import build_tiny_tower

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p for p in (REPO / "workflows" / "api").glob("*_api.json"))


def _runner():
    spec = importlib.util.spec_from_file_location("run_headless", REPO / "workflows" / "run_headless.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ui(api: Path) -> Path:
    return REPO / "workflows" / api.name.replace("_api.json", ".json")


def test_there_are_workflows_with_pictures():
    assert len(WORKFLOWS) >= 5
    for api in WORKFLOWS:
        stem = api.name[: -len("_api.json")]
        assert _ui(api).exists() and (REPO / "workflows" / f"{stem}.jpg").exists()
    # ComfyUI's templates browser lists workflows/*.json: only UI-format workflows are there
    for listed in (REPO / "workflows").glob("*.json"):
        ui = json.loads(listed.read_text())
        assert "nodes" in ui and "links" in ui and ui.get("version"), listed.name
        notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
        assert notes and "ComfyUI/models/visionzip" in notes[0]["widgets_values"][0], listed.name
        if any(n["type"] == "VisionZipLoadTower" for n in ui["nodes"]):
            assert "fetch-weights" in notes[0]["widgets_values"][0]


@pytest.mark.parametrize("api", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_matches_the_nodes(api, pack):
    ui = json.loads(_ui(api).read_text())
    prompt = json.loads(api.read_text())
    mappings = pack.NODE_CLASS_MAPPINGS
    by_id = {n["id"]: n for n in ui["nodes"] if n["type"] != "MarkdownNote"}  # notes are UI only
    assert {str(i) for i in by_id} == set(prompt)
    titles = {**pack.NODE_DISPLAY_NAME_MAPPINGS, "PreviewImage": "Preview Image", "LoadVideo": "Load Video",
              "LoadImage": "Load Image"}
    assert all(node["_meta"]["title"] == titles[node["class_type"]] for node in prompt.values())
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[src]["outputs"][src_slot]["type"] == kind
    for node in by_id.values():
        cls = mappings.get(node["type"])
        if cls is None:
            assert node["type"] in ("PreviewImage", "SaveImage", "LoadVideo", "LoadImage")
            continue
        spec = cls.INPUT_TYPES()
        widgets = [name for section in ("required", "optional") for name, (kind, *rest) in spec.get(section, {}).items()
                   if (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"))
                   and not (rest and rest[0].get("forceInput"))]
        assert len(node["widgets_values"]) == len(widgets) + ("seed" in widgets), node["type"]
        for name, value in prompt[str(node["id"])]["inputs"].items():
            assert name in {n for s in spec.values() for n in s}, (node["type"], name)
            if not isinstance(value, list):
                kind = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
                if isinstance(kind, list):
                    assert value in kind or name in ("video", "model"), (node["type"], name, value)


QWEN3 = pytest.mark.skipif(not hasattr(transformers, "Qwen3VLForConditionalGeneration"), reason="needs Qwen3-VL")


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", pytest.param("qwen3_vl", marks=QWEN3)])
@pytest.mark.parametrize("api", WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_runs_headless(api, family, tiny_model_dir, clip_factory, tmp_path):
    """Every shipped workflow with a checkpoint folder of each kind dropped in, nothing else changed."""
    prompt = json.loads(api.read_text())
    if family != "llava_onevision" and not any(n["class_type"] == "VisionZipLoadVLM" for n in prompt.values()):
        pytest.skip("no model to swap in this workflow")
    overrides = {}
    clip = clip_factory("wf.mkv", frames=150, options={"g": "30"})
    for node_id, node in prompt.items():
        if node["class_type"] == "VisionZipLoadVideo":
            if "video_input" not in node["inputs"]:
                overrides[f"{node_id}.path"] = clip
            overrides[f"{node_id}.max_size"] = 128
        if node["class_type"] == "LoadVideo":
            overrides[f"{node_id}.file"] = clip
        if node["class_type"] == "LoadImage":
            picture = tmp_path / "picture.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(picture)
            overrides[f"{node_id}.image"] = str(picture)
        if node["class_type"] == "VisionZipLoadVLM":
            overrides[f"{node_id}.path"] = tiny_model_dir(family)
        if node["class_type"] == "VisionZipLoadTower":
            overrides[f"{node_id}.path"] = _tiny_tower(tmp_path / "tower")
        if node["class_type"] == "VisionZipSaveTokens":
            overrides[f"{node_id}.filename_prefix"] = "tokens"  # inside --out (a workflow never writes outside it)
        if node["class_type"] in ("VisionZipAnswer", "VisionZipChat"):
            overrides[f"{node_id}.max_new_tokens"] = 4
    lines = []
    out = _runner().run(prompt, out=tmp_path / "out", overrides=overrides, log=lines.append)
    answers = [r[0] for i, r in out["results"].items()
               if prompt[i]["class_type"] in ("VisionZipAnswer", "VisionZipChat")]
    asks = sum(n["class_type"] in ("VisionZipAnswer", "VisionZipChat") for n in prompt.values())
    assert len(answers) == asks and all(isinstance(a, str) and a for a in answers)
    if any(n["class_type"] == "VisionZipPatchAttention" for n in prompt.values()):
        assert any("its 10 most attended patches get" in line for line in lines)
    if any(n["class_type"] == "PreviewImage" for n in prompt.values()):
        assert list((tmp_path / "out").glob("previewimage_*.png"))
    if any(n["class_type"] == "VisionZipSaveTokens" for n in prompt.values()):
        assert list((tmp_path / "out").glob("tokens_00001.safetensors"))
        saved = [i for i, n in prompt.items() if n["class_type"] == "VisionZipSaveTokens"]
        # a relative prefix lands in --out, not in the current folder's output/
        again = _runner().run(prompt, out=tmp_path / "out2",
                              overrides={**overrides, f"{saved[0]}.filename_prefix": "t/x"},
                              log=lambda _line: None)
        assert again["results"] and list((tmp_path / "out2" / "t").glob("x_00001.safetensors"))
    assert any("visual tokens" in line for line in lines) or not asks


def _tiny_tower(folder: Path) -> str:
    return build_tiny_tower(folder, layers=3)


def _api(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}_api.json").read_text())


@pytest.mark.parametrize("change,message", [
    (lambda p: p["3"].update(class_type="VisionZipNope"), "node 3 (VisionZipNope): unknown node type"),
    (lambda p: p["3"]["inputs"].pop("method"), "node 3 (VisionZipVideoToTokens): required input 'method' is missing"),
    (lambda p: p["3"]["inputs"].update(video=["99", 2]), "input 'video' links to node 99, which does not exist"),
    (lambda p: p["3"]["inputs"].update(video=["1", 7]),
     "links to output 7 of node 1 (VisionZipLoadVideo), which has 4 outputs"),
    (lambda p: p["3"]["inputs"].update(video=["1", 0]),
     "input 'video' needs VISIONZIP_VIDEO, but node 1 (VisionZipLoadVideo) output 0 is IMAGE"),
    (lambda p: p["1"]["inputs"].update(mode="frames"),
     "node 1 (VisionZipLoadVideo): input 'mode': 'frames' is not one of"),
    (lambda p: p["1"]["inputs"].update(num_frames=0), "input 'num_frames': 0 is below the minimum 1"),
    (lambda p: p["1"]["inputs"].update(fps=0), "input 'fps': 0 is below the minimum"),
    (lambda p: p["1"]["inputs"].update(every="ten"), "input 'every': 'ten' is not an integer"),
    (lambda p: p["4"]["inputs"].update(temperature=99.0), "input 'temperature': 99.0 is above the maximum 5.0"),
    (lambda p: p["1"]["inputs"].update(video="gone.mkv"),
     "node 1 (VisionZipLoadVideo): video 'gone.mkv' is not in ComfyUI's input folder"),
    (lambda p: p["4"]["inputs"].update(colour="red"), "node 4 (VisionZipAnswer): has no input 'colour'"),
])
def test_a_bad_workflow_is_refused_before_anything_runs(change, message, capsys, tmp_path, monkeypatch):
    prompt = _api("long_video_qa")
    change(prompt)
    path = tmp_path / "bad_api.json"
    path.write_text(json.dumps(prompt))
    runner = _runner()
    ran = []
    monkeypatch.setattr(runner, "_core", lambda *a: ran.append(a))  # nothing may run
    assert runner.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert all(line.startswith("error: node ") for line in err.splitlines()), err
    assert not ran and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--set", "1path=/x"], "--set '1path=/x': expected NODE.INPUT=VALUE"),
    (["--set", "1.path"], "expected NODE.INPUT=VALUE"),
    (["--set", "42.path=/x"], "--set 42.path: the workflow has no node 42"),
])
def test_malformed_overrides_are_one_line(argv, message, capsys):
    runner = _runner()
    assert runner.main([str(REPO / "workflows" / "api" / "long_video_qa_api.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_wrong_files_are_one_line(capsys, tmp_path):
    runner = _runner()
    (tmp_path / "broken.json").write_text("{not json")
    for path, message in [(tmp_path / "missing.json", "no such workflow file"),
                          (tmp_path / "broken.json", "not a JSON workflow"),
                          (REPO / "workflows" / "long_video_qa.json", "this is a UI-format workflow")]:
        assert runner.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_node_that_refuses_its_input_while_running_names_itself(capsys, tmp_path, tiny_model_dir):
    runner = _runner()
    code = runner.main([str(REPO / "workflows" / "api" / "long_video_qa_api.json"),
                        "--set", f"1.path={tmp_path / 'no.mp4'}",
                        "--set", f"2.path={tiny_model_dir('llava')}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "error: node 1 (VisionZipLoadVideo):" in err and "no.mp4: file not found" in err
    assert "Traceback" not in err
