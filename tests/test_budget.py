"""The budget planner: the model's context, the exact prompt length, fit and strict; and the chat's guard
that no prefill ever runs past the context. Tiny random checkpoints of every family, real loading code."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from comfy_visionzip import VisionZipError
from comfy_visionzip.answer import Chat, GenerationConfig
from comfy_visionzip.budget import context_length, fit_frames, plan_budget
from comfy_visionzip.models.base import PromptVideo
from comfy_visionzip.pipeline import compress_video
from comfy_visionzip.projection import project, visual_layout
from comfy_visionzip.prompt import PromptBuilder
from comfy_visionzip.testing.tiny import FAMILIES
from comfy_visionzip.video import VideoHandle
from comfy_visionzip.vlm import load_vlm


@pytest.fixture(scope="module")
def clip(clip_factory):
    return clip_factory("budget.mp4", frames=120, size=(96, 64), options={"g": "12"})


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = load_vlm(tiny_model_dir(family), device="cpu")
        return loaded[family]

    return get


def _prefill_lengths(vlm):
    """Record the cache length after every forward of the language model (what ran through it)."""
    seen = []

    def hook(_module, _args, kwargs, _output):
        emb = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(int(cache.get_seq_length()) if cache is not None else int(emb.shape[1]))

    return seen, vlm.model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,timestamps", [("visionzip", True), ("visionzip", False), ("full", True)])
def test_planned_prompt_is_the_prefilled_prompt_and_fits(family, method, timestamps, models, clip):
    vlm = models(family)
    budget, answer = (900, 7) if method == "visionzip" else (1500, 5)
    plan = plan_budget(vlm, clip, "What happens in this video ?", budget=budget, method=method, dominant=7,
                       contextual=3, max_new_tokens=answer, timestamps=timestamps, fps=30.0)
    assert plan.asked_frames == 120 and 1 <= plan.frames < 120  # the asked plan was thinned to fit
    assert plan.prompt_tokens + answer <= budget
    video = compress_video(vlm, plan.video, dominant=plan.dominant, contextual=plan.contextual, method=method)
    assert video.num_frames == plan.frames and video.indices == plan.indices
    chat = Chat(vlm, video, timestamps=timestamps)
    assert chat.visual.shape[0] == plan.visual_tokens
    seen, handle = _prefill_lengths(vlm)
    try:
        chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=answer))
    finally:
        handle.remove()
    assert chat.turns[0].prefill_tokens == plan.prompt_tokens  # to the token
    assert chat.note == ""  # the chat had nothing left to fit
    assert max(seen) <= budget
    # one frame more would not have fitted: the plan is the largest that fits
    if plan.frames < plan.asked_frames:
        bigger = plan_budget(vlm, clip, "What happens in this video ?", budget=budget + 10_000, method=method,
                             dominant=7, contextual=3, max_new_tokens=answer, timestamps=timestamps,
                             num_frames=plan.frames + 1)
        assert bigger.prompt_tokens + answer > budget


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_count_and_layout_are_exact(family, models, clip):
    vlm = models(family)
    builder = PromptBuilder(vlm, system=None, timestamps=True)
    messages = [{"role": "user", "text": "What is in this video ?"}, {"role": "assistant", "text": "a pancake ."},
                {"role": "user", "text": "and then ?"}]
    for frames, per in ((1, 10), (7, 33), (40, 5)):
        info = PromptVideo(frames, frames * per, tuple(0.37 * k for k in range(frames)), 12.0)
        assert builder.count(info, messages) == len(builder.ids(info, messages))
    for method in ("visionzip", "full", "pool", "uniform"):
        video = compress_video(vlm, clip, num_frames=3, dominant=5, contextual=2, method=method)
        layout = visual_layout(vlm, method=method, dominant=5, contextual=2, frame_size=video.meta["frame_size"])
        assert layout.total(3) == project(vlm, video).shape[0], method


def test_strict_refuses_with_the_numbers_and_fit_thins(models, clip):
    vlm = models("llava")
    kwargs = dict(budget=600, dominant=9, contextual=3, max_new_tokens=16, every=1)
    fitted = plan_budget(vlm, clip, "What happens ?", **kwargs)
    with pytest.raises(VisionZipError) as info:
        plan_budget(vlm, clip, "What happens ?", policy="strict", **kwargs)
    message = str(info.value)
    assert "the asked 120 frames x 12 tokens make a prompt of" in message
    assert f"ask for at most {fitted.frames} frames" in message
    assert "fit:" in fitted.summary() and f"{fitted.frames} of the 120 asked frames are kept" in fitted.summary()
    # strict passes a plan that fits, unchanged
    ok = plan_budget(vlm, clip, "What happens ?", policy="strict", **{**kwargs, "every": None},
                     num_frames=fitted.frames)
    assert ok.frames == fitted.frames and not ok.fitted
    # evenly spread: the first and last frames of the asked plan stay
    assert fitted.indices[0] == 0 and fitted.indices[-1] == 119


def test_budget_zero_is_the_context_and_a_budget_above_it_is_capped(models, clip):
    vlm = models("video_llava")
    assert context_length(vlm) == 4096
    plan = plan_budget(vlm, clip, "q", budget=0, context=800, dominant=9, contextual=3, every=1)
    assert plan.budget == plan.context == 800 and plan.total_tokens <= 800
    capped = plan_budget(vlm, clip, "q", budget=5000, context=800, dominant=9, contextual=3, every=1)
    assert capped.budget == 800 and "capped at the context of 800" in capped.summary()
    with pytest.raises(VisionZipError, match="more than the model's context of 800"):
        plan_budget(vlm, clip, "q", budget=5000, context=800, policy="strict", every=1)
    with pytest.raises(VisionZipError, match="not even one frame fits"):
        plan_budget(vlm, clip, "q", budget=300, context=800, dominant=50, contextual=10, max_new_tokens=250, every=1)
    with pytest.raises(VisionZipError, match="unknown policy"):
        plan_budget(vlm, clip, "q", policy="squeeze")
    with pytest.raises(VisionZipError, match="budget must be an integer >= 0"):
        plan_budget(vlm, clip, "q", budget=-1)


def test_context_is_read_from_the_checkpoint(tiny_model_dir, tmp_path, clip):
    folder = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir("llava_onevision"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 640
    (folder / "config.json").write_text(json.dumps(config))
    vlm = load_vlm(str(folder), device="cpu")
    assert context_length(vlm) == 640
    plan = plan_budget(vlm, clip, "What happens ?", dominant=9, contextual=3, max_new_tokens=20, fps=30.0)
    assert plan.budget == 640 and plan.prompt_tokens + 20 <= 640 and plan.frames < 120
    chat = Chat(vlm, compress_video(vlm, plan.video, dominant=9, contextual=3))
    chat.ask("What happens ?", GenerationConfig(max_new_tokens=20))
    assert chat.turns[0].prefill_tokens == plan.prompt_tokens and chat.cache.get_seq_length() <= 640


def test_auto_tokens_per_frame_picks_the_most_that_fit(models, clip):
    vlm = models("llava")  # 48 px tower, 6 px patches: 65 tokens per image uncompressed
    plan = plan_budget(vlm, clip, "q", tokens_per_frame="auto", budget=1200, max_new_tokens=8, num_frames=20)
    assert plan.frames == 20 and "at which every asked frame fits" in plan.summary()
    for per in (64, 32, 16):  # 192 and 128 exceed the tower; of the rest the largest that fits wins
        try:
            chosen = plan_budget(vlm, clip, "q", tokens_per_frame=per, budget=1200, max_new_tokens=8, num_frames=20,
                                 policy="strict")
        except VisionZipError:
            continue
        assert (chosen.dominant, chosen.contextual) == (plan.dominant, plan.contextual)
        break


def test_follow_ups_are_reserved_and_an_overflowing_one_is_refused(models, clip):
    vlm = models("llava")
    follow = ["and then ?", "who is in the kitchen ?"]
    plan = plan_budget(vlm, clip, "What happens ?", budget=700, dominant=9, contextual=3, max_new_tokens=6,
                       follow_ups=follow, every=1)
    chat = Chat(vlm, compress_video(vlm, plan.video, dominant=9, contextual=3), context=700)
    for q in ["What happens ?", *follow]:
        chat.ask(q, GenerationConfig(max_new_tokens=6))
    assert chat.cache.get_seq_length() <= 700
    # a conversation that has used its room: the next follow-up is refused with the numbers, nothing runs
    tight = Chat(vlm, compress_video(vlm, plan.video, dominant=9, contextual=3),
                 context=plan.prompt_tokens + 6)
    tight.ask("What happens ?", GenerationConfig(max_new_tokens=6))
    before = (list(tight.cached_ids), len(tight.turns))
    with pytest.raises(VisionZipError,
                       match=r"this follow-up does not fit the context: the conversation is \d+ tokens"):
        tight.ask("and then ?", GenerationConfig(max_new_tokens=6))
    assert (tight.cached_ids, len(tight.turns)) == before


def test_the_chat_fits_or_refuses_tokens_that_do_not_fit(models, clip):
    vlm = models("llava_next")
    video = compress_video(vlm, clip, num_frames=30, dominant=7, contextual=3)
    with pytest.raises(VisionZipError, match="the video does not fit: 30 frames x 51 tokens"):
        Chat(vlm, video, policy="strict", context=500).ask("What happens ?", GenerationConfig(max_new_tokens=10))
    chat = Chat(vlm, video, context=500)
    seen, handle = _prefill_lengths(vlm)
    try:
        chat.ask("What happens ?", GenerationConfig(max_new_tokens=10))
    finally:
        handle.remove()
    assert max(seen) <= 500 and chat.video.num_frames < 30
    assert f"kept {chat.video.num_frames} of 30 frames" in chat.note
    assert chat.video.timestamps == [video.timestamps[i] for i in range(30)
                                     if video.indices[i] in set(chat.video.indices)]


def test_fit_frames_is_the_largest_that_fits():
    assert fit_frames(lambda n: 10 * n + 3, 100, 50) == 9
    assert fit_frames(lambda n: 10 * n + 3, 5, 50) == 0
    assert fit_frames(lambda n: n, 1000, 50) == 50


def test_a_handle_is_planned_as_it_will_be_decoded(models, clip):
    vlm = models("llava_next")
    handle = VideoHandle(clip, num_frames=6)
    plan = plan_budget(vlm, handle, "q", budget=0)
    assert plan.frames == 6 and plan.video.cover is not None  # scaled at decode time for this encoder
    assert plan.video.frame_size() == tuple(compress_video(vlm, plan.video).meta["frame_size"])
    assert os.path.basename(str(plan.video.source)) == os.path.basename(clip)
    assert torch.is_tensor(compress_video(vlm, plan.video).tokens)


def test_room_reserved_for_follow_ups_when_the_chat_fits_the_video(models, clip):
    vlm = models("llava")
    video = compress_video(vlm, clip, num_frames=40, dominant=9, contextual=3)
    crowded = Chat(vlm, video, context=400)
    crowded.ask("What happens ?", GenerationConfig(max_new_tokens=5))
    with pytest.raises(VisionZipError, match="this follow-up does not fit"):
        crowded.ask("and then ?", GenerationConfig(max_new_tokens=5))
    roomy = Chat(vlm, video, context=400, reserve=40)
    roomy.ask("What happens ?", GenerationConfig(max_new_tokens=5))
    assert "follow-ups 40" in roomy.note and roomy.video.num_frames < crowded.video.num_frames
    roomy.ask("and then ?", GenerationConfig(max_new_tokens=5))
    assert roomy.cache.get_seq_length() <= 400 and roomy.turns[1].cached_tokens > 0
    with pytest.raises(VisionZipError, match="reserve must be an integer >= 0"):
        Chat(vlm, video, reserve=-1)
