"""Projector adapters and their label-free tuning (comfy_visionzip.tune / .adapter) on tiny random checkpoints:
the file and what it records, that it changes the projection and nothing else, refusals (another model, tokens
made with another adapter, writing into the checkpoint), resuming, the distillation loss itself, the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_visionzip import compress_video, load_vlm
from comfy_visionzip.__main__ import main
from comfy_visionzip.adapter import apply_adapter, read_adapter
from comfy_visionzip.errors import VisionZipError
from comfy_visionzip.projection import project
from comfy_visionzip.tune import TuneSettings, distill_loss, tune_projector

QUICK = TuneSettings(tokens_per_frame=8, steps=6, frames_per_video=4, answer_tokens=4, batch=2, lr=1e-2,
                     prompts=("Describe this image in detail.", "What is happening here?"))


def _folder_hash(folder: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pics") / "shapes.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, clip_factory, picture, tmp_path_factory):
    model = tiny_model_dir("llava")
    before = _folder_hash(model)
    vlm = load_vlm(model, dtype="float32")
    out = tmp_path_factory.mktemp("adapters") / "a.safetensors"
    said: list[str] = []
    result = tune_projector(vlm, [clip_factory("tune.mp4", frames=12), picture], out, settings=QUICK, say=said.append)
    return model, before, result, said


def test_tuning_writes_an_adapter_that_says_what_it_is_for_and_leaves_the_checkpoint_alone(tuned):
    model, before, result, said = tuned
    assert _folder_hash(model) == before  # the checkpoint folder is only read
    adapter = read_adapter(result.path)
    assert adapter.tuned_for == {"method": "visionzip", "dominant": 7, "contextual": 1, "tokens_per_frame": 8}
    assert adapter.model["family"] == "llava" and len(adapter.model["projector"]) == 24
    assert adapter.data["files"] == ["tune-" + Path(adapter.data["files"][0]).name.split("tune-")[1], "shapes.png"]
    # 4 frames of the clip + 1 picture, 2 prompts each: 10 teacher answers
    assert adapter.data["samples"] == 10 and result.steps == 6 == adapter.settings["steps"]
    assert set(adapter.weights) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert not list(Path(result.path).parent.glob(".*.work"))  # the work folder is gone once the adapter is written
    assert any("adapter written" in line for line in said)


def test_an_adapter_changes_the_projection_and_can_be_taken_off(tuned, clip_factory):
    model, _before, result, _said = tuned
    vlm = load_vlm(model, dtype="float32")
    clip = clip_factory("tune.mp4", frames=12)
    video = compress_video(vlm, clip, num_frames=2, dominant=7, contextual=1)
    own = project(vlm, video)
    own_weights = {k: v.clone() for k, v in vlm.inner.multi_modal_projector.state_dict().items()}
    apply_adapter(vlm, result.path)
    with pytest.raises(VisionZipError, match="projector adapter none vs"):  # tokens made without the adapter
        project(vlm, video)
    video_tuned = compress_video(vlm, clip, num_frames=2, dominant=7, contextual=1)
    assert video_tuned.meta["adapter"] == vlm.adapter.id
    changed = project(vlm, video_tuned)
    assert changed.shape == own.shape and not torch.allclose(changed, own)
    for k, v in vlm.inner.multi_modal_projector.state_dict().items():  # the model's own projector is untouched
        assert torch.equal(v, own_weights[k])
    apply_adapter(vlm, None)
    assert torch.allclose(project(vlm, video), own)


def test_load_vlm_takes_an_adapter_and_another_model_refuses_it(tuned, tiny_model_dir, tmp_path):
    model, _before, result, _said = tuned
    vlm = load_vlm(model, dtype="float32", adapter=result.path)
    assert vlm.adapter is not None and vlm.token_identity()["adapter"] == vlm.adapter.id
    with pytest.raises(VisionZipError, match="was tuned for .*not for"):
        load_vlm(tiny_model_dir("llava_next"), dtype="float32", adapter=result.path)
    with pytest.raises(VisionZipError, match="no such file"):
        load_vlm(model, adapter=str(tmp_path / "nothing.safetensors"))
    # the same kind of model, other weights (another build of the same checkpoint): refused, saying so
    from comfy_visionzip.testing.tiny import build_tiny

    rebuilt = build_tiny("llava", tmp_path / "llava-other-seed", seed=1)
    with pytest.raises(VisionZipError, match=r"does not fit llava-other-seed: .*projector weights differ .*another "
                                             r"build or version of this one; its folder was named 'llava'"):
        load_vlm(rebuilt, dtype="float32", adapter=result.path)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(VisionZipError, match="not a VisionZip projector adapter"):
        load_vlm(model, adapter=str(foreign))


def test_bad_requests_are_refused_before_any_work(tiny_model_dir, clip_factory, tmp_path):
    model = tiny_model_dir("llava")
    vlm = load_vlm(model, dtype="float32")
    clip = clip_factory("tune.mp4", frames=12)
    with pytest.raises(VisionZipError, match="into the model's folder"):
        tune_projector(vlm, [clip], Path(model) / "a.safetensors", settings=QUICK)
    with pytest.raises(VisionZipError, match="no such file"):
        tune_projector(vlm, [str(tmp_path / "missing.mp4")], tmp_path / "a.safetensors", settings=QUICK)
    with pytest.raises(VisionZipError, match="ends in .safetensors"):
        tune_projector(vlm, [clip], tmp_path / "a.bin", settings=QUICK)
    with pytest.raises(VisionZipError, match="tokens_per_frame"):
        TuneSettings(tokens_per_frame=0).check()
    with pytest.raises(VisionZipError, match="method"):
        TuneSettings(method="full").check()
    qwen = load_vlm(tiny_model_dir("qwen2_5_vl"), dtype="float32")
    with pytest.raises(VisionZipError, match="merger"):
        tune_projector(qwen, [clip], tmp_path / "q.safetensors", settings=QUICK)


def test_an_interrupted_tuning_resumes_where_it_stopped(tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), dtype="float32")
    clip = clip_factory("tune.mp4", frames=12)
    out = tmp_path / "r.safetensors"
    settings = TuneSettings(**{**QUICK.__dict__, "steps": 5})

    def stop_at_three(stage: str, done: int, total: int) -> None:
        if stage == "train" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_projector(vlm, [clip], out, settings=settings, progress=stop_at_three)
    assert not out.exists() and (tmp_path / ".r.safetensors.work" / "state.safetensors").is_file()
    said: list[str] = []
    result = tune_projector(vlm, [clip], out, settings=settings, say=said.append)
    assert "resuming: the teacher's" in said[0] and any("resuming at step 3" in line for line in said)
    assert result.steps == 5 and len(result.history) == 5


def test_supervised_tuning_learns_the_given_answers_without_a_teacher(tiny_model_dir, picture, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), dtype="float32")
    labels = {picture: [("What is this?", "a cat"), ("Where?", "here")]}
    said: list[str] = []
    settings = TuneSettings(**{**QUICK.__dict__, "steps": 30, "batch": 2, "lr": 0.1})
    result = tune_projector(vlm, [picture], tmp_path / "s.safetensors", settings=settings, labels=labels,
                            say=said.append)
    assert said[0] == "1 labelled file(s): tuning on their answers (no teacher)"
    assert result.adapter.data["labelled_files"] == 1 and result.adapter.data["samples"] == 2
    # the answers' cross-entropy goes down as the projector learns them (slowly: in a tiny random model the
    # pictures barely move the logits)
    assert np.mean(result.history[-5:]) < np.mean(result.history[:5]), result.history
    with pytest.raises(VisionZipError, match="labels for files that are not tuned on: other.png"):
        tune_projector(vlm, [picture], tmp_path / "t.safetensors", settings=settings,
                       labels={str(tmp_path / "other.png"): [("q", "a")]})


def test_distill_loss_is_the_kl_divergence_and_zero_when_the_student_agrees():
    torch.manual_seed(0)
    teacher = torch.randn(3, 11)
    p = torch.softmax(teacher, -1)
    top = p.topk(11, -1)
    probs = torch.cat([top.values, torch.zeros(3, 1)], -1)
    assert float(distill_loss(teacher, top.indices, probs, 1.0)) == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(3, 11)
    expected = torch.nn.functional.kl_div(torch.log_softmax(student, -1), p, reduction="batchmean")
    assert float(distill_loss(student, top.indices, probs, 1.0)) == pytest.approx(float(expected), rel=1e-4)
    # top-k with the rest in one bucket: still >= 0, and 0 when the student matches the teacher
    top3 = p.topk(3, -1)
    bucket = torch.cat([top3.values, 1 - top3.values.sum(-1, keepdim=True)], -1)
    assert float(distill_loss(teacher, top3.indices, bucket, 1.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(distill_loss(student, top3.indices, bucket, 1.0)) > 0
    # a one-hot target (what labelled tuning stores: the answer id, probability 1, nothing in the rest) is the
    # cross-entropy of the answer
    answer = torch.tensor([4, 0, 9])
    one_hot = torch.tensor([[1.0, 0.0]] * 3)
    assert float(distill_loss(student, answer[:, None], one_hot, 1.0)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(student, answer)), rel=1e-4)


def test_the_command_line_tunes_and_asks_with_the_adapter(tiny_model_dir, clip_factory, tmp_path, capsys):
    model = tiny_model_dir("llava")
    clip = clip_factory("tune.mp4", frames=12)
    out = tmp_path / "cli.safetensors"
    assert main(["tune-projector", model, clip, "--tokens-per-frame", "8", "--steps", "2", "--frames-per-video",
                 "2", "--answer-tokens", "3", "--out", str(out)]) == 0
    assert out.is_file() and "--adapter" in capsys.readouterr().out
    assert main(["ask", clip, "What is it?", "--model", model, "--adapter", str(out), "--tokens-per-frame", "8",
                 "--frames", "2", "--max-new-tokens", "2"]) == 0
    said = capsys.readouterr().out
    assert "adapter: cli.safetensors (tuned for visionzip 8 tokens per frame" in said and "note:" not in said
    assert main(["ask", clip, "What is it?", "--model", model, "--adapter", str(out), "--tokens-per-frame", "16",
                 "--frames", "2", "--max-new-tokens", "2"]) == 0  # it runs, and says the adapter was made for 8
    assert ("note: adapter cli.safetensors was tuned for visionzip 7+1 (8 tokens per frame), these tokens are "
            "visionzip 14+2: answers may be worse") in capsys.readouterr().out
    assert main(["tune-projector", model, str(tmp_path / "none.mp4"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "none.mp4: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "video_llava", "llava_next_video"])
def test_every_llava_family_tunes_and_uses_an_adapter(family, tiny_model_dir, clip_factory, tmp_path):
    vlm = load_vlm(tiny_model_dir(family), dtype="float32")
    clip = clip_factory("tune.mp4", frames=12)
    settings = TuneSettings(**{**QUICK.__dict__, "steps": 2, "frames_per_video": 2})
    result = tune_projector(vlm, [clip], tmp_path / "f.safetensors", settings=settings)
    assert result.steps == 2 and read_adapter(result.path).model["family"] == vlm.family.model_type
    video = compress_video(vlm, clip, num_frames=2, dominant=7, contextual=1)
    own = project(vlm, video)
    apply_adapter(vlm, result.path)
    tuned = project(vlm, compress_video(vlm, clip, num_frames=2, dominant=7, contextual=1))
    assert tuned.shape == own.shape and not torch.allclose(tuned, own)  # newline tokens and tiles arranged alike


def test_an_anchor_keeps_full_tokens_closer_to_the_models_own(tiny_model_dir, clip_factory, picture, tmp_path):
    """The anchor (a share of each step read from every token) holds the tuned projector where full tokens need it:
    at full tokens its projection stays nearer the model's own than an adapter tuned on compressed tokens alone,
    and the adapter records the anchor and the held-out loss at full tokens."""
    from comfy_visionzip.tune import anchor_count

    model = tiny_model_dir("llava")
    vlm = load_vlm(model, dtype="float32")
    sources = [clip_factory("tune.mp4", frames=12), picture]
    made = {}
    for anchor in (0.0, 0.5):
        settings = TuneSettings(**{**QUICK.__dict__, "steps": 20, "anchor": anchor, "held_out": 0.3})
        made[anchor] = tune_projector(vlm, sources, tmp_path / f"a{anchor}.safetensors", settings=settings)
    plain, anchored = (read_adapter(made[a].path).settings for a in (0.0, 0.5))
    assert plain["anchor_per_step"] == 0 and anchored["anchor_per_step"] == 1
    # the held-out distillation loss at full tokens (0 for the model's own projector): lower with the anchor
    assert 0 <= anchored["full_tokens_loss_after"] < plain["full_tokens_loss_after"], \
        (anchored, plain)
    assert anchor_count(TuneSettings(batch=8, anchor=0.25)) == 2 and anchor_count(TuneSettings(batch=1)) == 0
    assert anchor_count(TuneSettings(batch=2, anchor=0.9)) == 1  # never the whole batch


def test_chat_says_when_the_adapter_was_tuned_for_other_tokens(tuned, clip_factory):
    from comfy_visionzip import Chat

    model, _before, result, _said = tuned
    vlm = load_vlm(model, dtype="float32", adapter=result.path)
    clip = clip_factory("tune.mp4", frames=12)
    assert Chat(vlm, compress_video(vlm, clip, dominant=7, contextual=1, num_frames=2)).adapter_note == ""
    note = Chat(vlm, compress_video(vlm, clip, num_frames=2)).adapter_note  # 54+10 is not what it was tuned for
    assert note.startswith("adapter a.safetensors was tuned for visionzip 7+1") and "visionzip 54+10" in note
    full = compress_video(vlm, clip, method="full", num_frames=2)
    assert Chat(vlm, full).adapter_note == ("adapter a.safetensors is for compressed tokens: these are full tokens, "
                                            "so they go through the model's own projector")
    # ... and they do: full tokens project exactly as without the adapter; compressed ones do not
    plain = load_vlm(model, dtype="float32")
    full_plain = compress_video(plain, clip, method="full", num_frames=2)
    assert torch.equal(project(vlm, full), project(plain, full_plain))
    small = compress_video(vlm, clip, dominant=7, contextual=1, num_frames=2)
    small_plain = compress_video(plain, clip, dominant=7, contextual=1, num_frames=2)
    assert not torch.allclose(project(vlm, small), project(plain, small_plain))
    assert Chat(plain, compress_video(plain, clip, num_frames=2)).adapter_note == ""
