"""Tokens files carry a format version: this version writes format 2; format 1 files (no token positions,
Qwen's dynamic resolution as an unnamed tuple) are read and migrated; newer or unknown formats are refused
with one line that says what to do."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_visionzip.answer import Chat, GenerationConfig
from comfy_visionzip.errors import VisionZipError
from comfy_visionzip.pipeline import compress_video
from comfy_visionzip.store import FORMAT, load_tokens, save_tokens
from comfy_visionzip.temporal import Temporal, apply
from comfy_visionzip.vlm import load_vlm


def _rewrite(path, out, *, drop=(), change=None):
    """A copy of a tokens file with tensors left out and its metadata changed (what an older version wrote)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["visionzip"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    (change or (lambda m: None))(meta)
    save_file(tensors, str(out), metadata={"visionzip": json.dumps(meta)})
    return out


def _as_format_1(meta):
    meta["format"] = "comfyui-visionzip/tokens/1"
    prep = meta.get("preprocess")
    if prep and prep.get("dynamic"):
        d = prep.pop("dynamic")
        prep["pixels"] = [d["factor"], d["min_pixels"], d["max_pixels"], d["patch"], d["temporal"]]
    elif prep is not None:
        prep.pop("dynamic", None)
        prep["pixels"] = None


def test_this_version_writes_format_2_and_reads_it_back(tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=4, dominant=5, contextual=2)
    path = save_tokens(video, tmp_path / "v")
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["visionzip"])["format"] == FORMAT == "comfyui-visionzip/tokens/2"
    back = load_tokens(path, model=vlm)
    assert back.preprocess == video.preprocess and back.positions is not None
    assert back.tokens.equal(video.tokens) and back.positions.equal(video.positions)


def test_a_format_1_file_is_migrated_and_answers_the_same(tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=4, dominant=5, contextual=2)
    new = save_tokens(video, tmp_path / "new")
    old = _rewrite(new, tmp_path / "old.safetensors", drop=("positions",), change=_as_format_1)
    migrated = load_tokens(old, model=vlm)
    assert migrated.positions is None and migrated.preprocess == video.preprocess
    config = GenerationConfig(max_new_tokens=4)
    assert Chat(vlm, migrated).ask("What ?", config) == Chat(vlm, load_tokens(new, model=vlm)).ask("What ?", config)
    with pytest.raises(VisionZipError, match="format 1.*encode the video again"):  # what needs positions says so
        apply(migrated, Temporal())


def test_a_format_1_qwen_file_gets_its_dynamic_resolution_by_name(tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("qwen2_5_vl"), device="cpu")
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=4, dominant=5, contextual=2)
    new = save_tokens(video, tmp_path / "new")
    old = _rewrite(new, tmp_path / "old.safetensors", change=_as_format_1)
    migrated = load_tokens(old, model=vlm)
    assert migrated.preprocess == video.preprocess and migrated.preprocess.dynamic is not None
    without = _rewrite(new, tmp_path / "nopos.safetensors", drop=("positions",), change=_as_format_1)
    with pytest.raises(VisionZipError, match="format 1.*a Qwen model.*encode the video again"):
        Chat(vlm, load_tokens(without, model=vlm))


@pytest.mark.parametrize("written, message", [
    ("comfyui-visionzip/tokens/3", "newer than this ComfyUI-VisionZip reads .2.; update the pack"),
    ("someone-else/tokens/1", "unknown tokens format"),
    ("comfyui-visionzip/tokens/x", "unknown tokens format"),
])
def test_newer_or_unknown_formats_are_refused_in_one_line(written, message, tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=2, dominant=5, contextual=2)
    path = _rewrite(save_tokens(video, tmp_path / "v"), tmp_path / "other.safetensors",
                    change=lambda meta: meta.update(format=written))
    with pytest.raises(VisionZipError, match=message) as error:
        load_tokens(path)
    assert "\n" not in str(error.value)


def test_preprocessing_round_trips_through_the_file(tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava_next"), device="cpu")  # anyres pinpoints: nested tuples
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=2, dominant=5, contextual=2)
    back = load_tokens(save_tokens(video, tmp_path / "v"), model=vlm)
    assert dataclasses.asdict(back.preprocess) == dataclasses.asdict(video.preprocess)


def _hostile(path, out, *, tensors=None, meta=None, raw=None):
    """A copy of a tokens file with tensors replaced/added and the metadata changed (or replaced by raw text)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["visionzip"])
        values = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in (tensors or {}).items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value(values) if callable(value) else value
    (meta or (lambda m: None))(header)
    save_file(values, str(out), metadata={"visionzip": raw if raw is not None else json.dumps(header)})
    return out


HOSTILE = {
    "metadata not JSON": dict(raw="{not json"),
    "metadata a list": dict(raw="[1, 2]"),
    "no timestamps": dict(meta=lambda m: m.pop("timestamps")),
    "timestamps of the wrong length": dict(meta=lambda m: m.update(timestamps=[0.0])),
    "a NaN timestamp as text": dict(meta=lambda m: m.update(timestamps=["nan"] * 4)),
    "an unknown method": dict(meta=lambda m: m.update(method="magic")),
    "grid of three numbers": dict(meta=lambda m: m.update(grid=[1, 2, 3])),
    "crops as text": dict(meta=lambda m: m.update(crops="2")),
    "unknown preprocessing": dict(meta=lambda m: m["preprocess"].update(wobble=1)),
    "NaN tokens": dict(tensors={"tokens": lambda t: t["tokens"].clone().fill_(float("nan"))}),
    "integer tokens": dict(tensors={"tokens": lambda t: t["tokens"].long()}),
    "empty tokens": dict(tensors={"tokens": torch.zeros(0, 7, 32)}),
    "positions of the wrong shape": dict(tensors={"positions": lambda t: t["positions"][:1]}),
    "negative positions": dict(tensors={"positions": lambda t: t["positions"] - 1000}),
    "repeats pointing ahead": dict(tensors={"repeats": lambda t: torch.full_like(t["positions"], 27)}),
    "assignment out of range": dict(tensors={"assignment": lambda t: t["assignment"] + 100}),
    "an unknown tensor": dict(tensors={"extra": torch.zeros(1)}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_tokens_file_is_refused_in_one_line(case, tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=4, dominant=5, contextual=2)
    good = save_tokens(video, tmp_path / "good")
    bad = _hostile(good, tmp_path / "bad.safetensors", **HOSTILE[case])
    with pytest.raises(VisionZipError) as error:
        load_tokens(bad, model=vlm)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(bad)) and "again" in message, message


def test_tokens_that_do_not_say_what_made_them_are_refused(tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip_factory("tf.mp4", frames=30), num_frames=2, dominant=5, contextual=2)
    stripped = _hostile(save_tokens(video, tmp_path / "v"), tmp_path / "stripped.safetensors",
                        meta=lambda m: m.update(meta={}))
    other = load_vlm(tiny_model_dir("llava_next"), device="cpu")
    with pytest.raises(VisionZipError, match="do not say which model made them"):
        load_tokens(stripped, model=other)
    with pytest.raises(VisionZipError, match="do not say which model made them"):
        Chat(vlm, load_tokens(stripped))


@pytest.mark.parametrize("path", [None, 3, b"x.safetensors"])
def test_a_tokens_path_of_the_wrong_kind_is_one_line(path):
    with pytest.raises(VisionZipError, match="given by its path"):
        load_tokens(path)
