"""The probe model (a LLaVA-1.5 trained by `train-probe` on the real DINOv2) answers held-out questions right,
through every way the pack asks: Chat, the command line, a headless workflow, tokens saved and loaded, a plan the
budget thinned. Skipped where the probe model has not been built (scripts/test.sh builds it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from comfy_visionzip import Chat, GenerationConfig, compress_video, load_tokens, load_vlm, plan_budget, save_tokens
from comfy_visionzip.__main__ import main
from comfy_visionzip.probe import fidelity, footage, scenes
from comfy_visionzip.probe.train import find_probe

pytestmark = pytest.mark.needs_weights

REPO = Path(__file__).resolve().parents[1]
PER_TASK = 12
# Stated rates on the held-out questions below (test backgrounds the training never saw), for the tasks the model
# answers best with full tokens (bench/results/fidelity.md, format-2 build: colour 0.998, shape 0.985, brightness
# 0.994, count 0.868 on 1000 questions each); the rates leave room for a model rebuilt on another machine.
FULL_RATE = 0.85
VISIONZIP_RATE = 0.55  # 54 dominant + 10 contextual of 256 tokens, the paper's LLaVA-1.5 default ratio
HEADLINE = ("colour", "shape", "brightness", "count")
VIDEOS = 24
ORDER_RATE = 0.6  # which of two events comes first (chance 0.5)
ANSWER = GenerationConfig(max_new_tokens=3)


@pytest.fixture(scope="module")
def probe():
    folder = find_probe()
    if folder is None:
        pytest.skip("the probe model is not built (python -m comfy_visionzip train-probe)")
    return folder, load_vlm(folder, device="cpu", dtype="float32")


def _rate(answers: list[tuple[str, str]]) -> float:
    return sum(said == truth for said, truth in answers) / len(answers)


def test_full_tokens_and_visionzip_answer_held_out_questions(probe):
    _folder, vlm = probe
    items, encoded = _held(probe)
    full, zipped = [], []
    for k, (_scene, q, _image) in enumerate(items):
        one = fidelity.single(encoded, k)
        full.append((fidelity.ask(vlm, fidelity.condition(vlm, one, "full", None), q.text), q.answer))
        video = fidelity.condition(vlm, one, "visionzip", 64)
        assert video.dominant == 54 and video.contextual == 10
        zipped.append((fidelity.ask(vlm, video, q.text), q.answer))
    assert _rate(full) >= FULL_RATE, full
    assert _rate(zipped) >= VISIONZIP_RATE, zipped


_CACHE: dict = {}


def _held(probe):
    """The held-out questions (carphone and unseen textures only, so the same on every machine) and their encodings."""
    if "items" not in _CACHE:
        photos, _clips = footage.test_photos(shared=False)
        items = list(fidelity.test_items(photos, PER_TASK, seed=99, tasks=HEADLINE))
        encoder = probe[1].video_encoder()
        _CACHE["items"] = items
        _CACHE["encoded"] = encoder.encode(torch.from_numpy(np.stack([image for _s, _q, image in items])))
    return _CACHE["items"], _CACHE["encoded"]


def _pictures(tmp_path: Path, probe, count: int) -> list[tuple[str, scenes.Question]]:
    items, _encoded = _held(probe)
    out = []
    for k in range(0, len(items), max(1, len(items) // count))[:count]:
        _scene, q, image = items[k]
        path = tmp_path / f"picture{k}.png"
        Image.fromarray(image).save(path)
        out.append((str(path), q))
    return out


def test_the_command_line_answers_pictures(probe, tmp_path, capsys):
    folder, _vlm = probe
    answers = []
    for path, q in _pictures(tmp_path, probe, 10):
        assert main(["ask", path, q.text, "--model", folder, "--max-new-tokens", "3", "--device", "cpu",
                     "--dtype", "fp32"]) == 0
        printed = capsys.readouterr().out
        said = re.search(r"\nA: (.*)\n", printed).group(1)
        assert "1 frame x 64 tokens" in printed  # the command line's default: VisionZip's 54 + 10
        answers.append((fidelity.parse(said), q.answer))
    assert _rate(answers) >= VISIONZIP_RATE, answers


def test_a_headless_workflow_answers_a_picture(probe, tmp_path):
    import importlib.util

    folder, _vlm = probe
    spec = importlib.util.spec_from_file_location("run_headless", REPO / "workflows" / "run_headless.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    prompt = json.loads((REPO / "workflows" / "api" / "long_video_qa_api.json").read_text())
    ids = {n["class_type"]: i for i, n in prompt.items()}
    answers = []
    for path, q in _pictures(tmp_path, probe, 4):
        overrides = {f"{ids['VisionZipLoadVideo']}.path": path, f"{ids['VisionZipLoadVLM']}.path": folder,
                     f"{ids['VisionZipVideoToTokens']}.method": "full",
                     f"{ids['VisionZipAnswer']}.question": q.text, f"{ids['VisionZipFrameBudget']}.question": q.text,
                     f"{ids['VisionZipAnswer']}.max_new_tokens": 3, f"{ids['VisionZipChat']}.max_new_tokens": 3,
                     f"{ids['VisionZipChat']}.question": "What is the background?"}
        out = runner.run(prompt, out=tmp_path / "out", overrides=overrides, log=lambda _line: None)
        answers.append((fidelity.parse(out["results"][ids["VisionZipAnswer"]][0]), q.answer))
    assert _rate(answers) >= FULL_RATE - 0.1, answers  # 4 pictures: at most one wrong


def test_saved_tokens_give_the_same_answers(probe, tmp_path):
    _folder, vlm = probe
    items, encoded = _held(probe)
    for k in range(0, len(items), 7):
        _scene, q, _image = items[k]
        video = fidelity.condition(vlm, fidelity.single(encoded, k), "visionzip", 64)
        path = save_tokens(video, tmp_path / f"t{k}.safetensors")
        again = load_tokens(path, model=vlm)
        assert torch.equal(again.tokens, video.tokens)
        assert Chat(vlm, again).ask(q.text, ANSWER) == Chat(vlm, video).ask(q.text, ANSWER)


def _still_clip(path: Path, image: np.ndarray, seconds: int = 12) -> str:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuv444p"
        stream.options = {"crf": "12"}
        for _ in range(2 * seconds):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def test_the_planner_thinning_a_still_video_keeps_its_answers(probe, tmp_path):
    """A still video (the same picture for 12 s): asked with 12 frames, and with a budget that thins them to a
    few, the answers are the picture's."""
    _folder, vlm = probe
    items, _encoded = _held(probe)
    answers, kept = [], []
    for k in range(0, len(items), 6):
        _scene, q, image = items[k]
        clip = _still_clip(tmp_path / f"still{k}.mp4", image)
        for budget in (0, 330):
            plan = plan_budget(vlm, clip, q.text, budget=budget, fps=1.0, max_new_tokens=3, tokens_per_frame=64)
            video = compress_video(vlm, plan.video, compression=plan.compression)
            kept.append(video.num_frames)
            answers.append((fidelity.parse(Chat(vlm, video).ask(q.text, ANSWER)), q.answer))
    assert max(kept) == 12 and min(kept) <= 4  # the budget did thin the plan
    assert _rate(answers) >= VISIONZIP_RATE, answers


def test_eighty_compressed_frames_tell_which_event_comes_first(probe):
    """The video claim, through Chat: 80-second test videos (carphone and unseen textures, so the same on every
    machine) with two 2-4 s events; "Which comes first?" asked of 80 frames x VisionZip 25 tokens (2,000 visual
    tokens) is right far more often than of 8 full frames at about the same budget, which mostly miss the events."""
    _folder, vlm = probe
    encoder = vlm.video_encoder()
    sequences = fidelity.backgrounds(footage.test_clips(shared=False))
    encoded = fidelity.encode_sequences(encoder, sequences)
    right = {"80 x visionzip 25": [], "8 x full": []}
    for v, item in enumerate(fidelity.video_items(VIDEOS, len(sequences), seed=99)):
        frames = fidelity.video_frames(encoder, item, sequences[item.background][1], encoded[item.background], seed=v)
        for name, picked, method, k in (("80 x visionzip 25", list(range(fidelity.VIDEO_SECONDS)), "visionzip", 25),
                                        ("8 x full", fidelity.full_frames(8), "full", None)):
            video = fidelity.video_condition(vlm, [frames[t] for t in picked], picked, method, k)
            right[name].append(fidelity.ask(vlm, video, item.order.text) == item.order.answer)
    rates = {name: sum(r) / len(r) for name, r in right.items()}
    assert rates["80 x visionzip 25"] >= ORDER_RATE, rates
    assert rates["80 x visionzip 25"] >= rates["8 x full"] + 0.1, rates
