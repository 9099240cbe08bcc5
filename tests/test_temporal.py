"""The temporal stage: repeats of earlier frames' tokens dropped as the video streams, time kept, every
family's prompt, positions, chat and tokens files."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from comfy_visionzip import VisionZipError, temporal
from comfy_visionzip.answer import Chat, GenerationConfig
from comfy_visionzip.pipeline import compress_frames, compress_video, label_tokens
from comfy_visionzip.store import load_tokens, save_tokens
from comfy_visionzip.temporal import Temporal, thin
from comfy_visionzip.testing.synthetic import make_scene_clip
from comfy_visionzip.testing.tiny import ALL_FAMILIES
from comfy_visionzip.vlm import load_vlm

FAMILIES = [f for f in ALL_FAMILIES if f != "qwen3_vl" or hasattr(transformers, "Qwen3VLForConditionalGeneration")]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    return {m: make_scene_clip(folder / f"{m}.mp4", motion=m, frames=90, size=(192, 108))
            for m in ("static", "slow", "fast", "cuts")}


def test_settings_parse_and_refuse_nonsense():
    assert Temporal.parse(None) is None and Temporal.parse(False) is None and Temporal.parse(0) is None
    assert Temporal.parse(True) == Temporal()
    assert Temporal.parse(0.85).threshold == 0.85 and Temporal.parse("0.7").threshold == 0.7
    assert Temporal.parse(4000).budget == 4000 and Temporal.parse("4000").budget == 4000
    for bad in (-0.5, 1.5, "soon", 1):
        with pytest.raises(VisionZipError, match="temporal"):
            Temporal.parse(bad)
    with pytest.raises(VisionZipError, match="radius"):
        Temporal(radius=9)


def test_static_stretches_cost_far_fewer_tokens_than_motion(tiny_model_dir, clips):
    """On a random tower (features of unlike frames are still alike); the real encoder's numbers are below."""
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    per_frame = 24 * 8
    cost = {}
    for motion, clip in clips.items():
        video = compress_video(vlm, clip, num_frames=24, dominant=6, contextual=2, temporal=True)
        assert video.num_frames == 24 and video.tokens.shape[:2] == (24, 8)
        assert all(n >= 1 for n in video.frame_tokens())  # every frame keeps at least one token
        cost[motion] = video.total_tokens
    assert cost["static"] <= 8 + 23 and cost["static"] < per_frame * 0.2  # the first frame + one token a frame
    assert cost["fast"] > 3 * cost["static"] and cost["static"] < cost["slow"]
    cuts = compress_video(vlm, clips["cuts"], num_frames=24, dominant=6, contextual=2, temporal=True)
    assert cuts.meta["temporal_segments"] == 4  # four static shots: each starts whole
    assert cuts.total_tokens <= 4 * 8 + 20


def test_streaming_equals_the_whole_video_pass_and_batches_do_not_matter(tiny_model_dir, clips):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    plain = compress_video(vlm, clips["slow"], num_frames=20, dominant=6, contextual=2)
    assert plain.repeats is None and plain.total_tokens == 160
    after = temporal.apply(plain, Temporal())
    for batch in (3, 8, 20):
        streamed = compress_video(vlm, clips["slow"], num_frames=20, dominant=6, contextual=2, temporal=True,
                                  batch_size=batch)
        assert torch.equal(streamed.repeats, after.repeats)
    # each dropped token points at a kept token of an earlier frame
    flat = after.repeats.long().flatten()
    own = torch.arange(flat.numel())
    dropped = flat != own
    assert bool((flat[dropped] < own[dropped]).all()) and bool((flat[flat[dropped]] == flat[dropped]).all())
    spans = after.spans()
    keep = after.keep
    assert int(spans[keep].max()) == 19 and bool((spans[keep] >= torch.arange(20)[:, None].expand(-1, 8)[keep]).all())


def test_thinning_brings_back_the_repeats_of_frames_it_leaves_out(tiny_model_dir, clips):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clips["static"], num_frames=12, dominant=6, contextual=2, temporal=True)
    assert video.frame_tokens()[0] == 8 and video.total_tokens == 8 + 11
    later = thin(video, [3, 5, 11])  # the first frame (which all the others repeat) is left out
    assert later.frame_tokens() == [8, 1, 1]  # frame 3 is kept whole again, and the others now repeat it
    assert torch.equal(later.tokens, video.tokens[[3, 5, 11]])


def test_a_budget_tightens_the_threshold_until_the_tokens_fit(tiny_model_dir, clips):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    loose = compress_video(vlm, clips["slow"], num_frames=24, dominant=6, contextual=2, temporal=0.999)
    budget = loose.total_tokens // 2
    fitted = compress_video(vlm, clips["slow"], num_frames=24, dominant=6, contextual=2,
                            temporal=Temporal(0.999, budget=budget))
    assert fitted.total_tokens <= budget < loose.total_tokens
    assert fitted.meta["temporal"]["threshold"] < 0.999
    with pytest.raises(VisionZipError, match="compressed tokens"):
        compress_video(vlm, clips["slow"], num_frames=4, method="full", temporal=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prompts_exactly_the_kept_tokens_and_follow_ups_reuse_the_cache(
        family, tiny_model_dir, clips, tmp_path):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clips["static"], num_frames=12, dominant=6, contextual=2, temporal=True)
    assert video.total_tokens < video.num_frames * video.tokens_per_frame
    chat = Chat(vlm, video)
    chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=4))
    placeholders = sum(1 for i in chat.cached_ids if i == chat.token_id)
    extra = {"llava_onevision": 1, "llava_next": video.num_frames}.get(family, 0)  # newlines
    assert placeholders == video.total_tokens + extra
    text = vlm.tokenizer.decode(chat.cached_ids)
    if family == "llava":  # every frame keeps its time label
        assert text.count("frame at") == 12
    chat.ask("and then ?", GenerationConfig(max_new_tokens=3))
    assert chat.turns[1].cached_tokens >= chat.turns[0].prefill_tokens and chat.turns[1].prefill_tokens < 15
    path = save_tokens(video, tmp_path / family)
    again = load_tokens(path, model=vlm)
    assert torch.equal(again.repeats, video.repeats) and again.total_tokens == video.total_tokens
    assert (Chat(vlm, again).ask("What happens in this video ?", GenerationConfig(max_new_tokens=4))
            == chat.turns[0].answer)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.startswith("qwen")])
def test_qwen_kept_tokens_keep_their_own_positions_with_the_temporal_stage(family, tiny_model_dir, clips):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    from comfy_visionzip import sample_video

    frames = sample_video(clips["slow"], num_frames=8)
    encoder = vlm.video_encoder()
    zipped = compress_frames(encoder, [frames], dominant=6, contextual=2, temporal=True)
    full = compress_frames(encoder, [frames], dominant=1, contextual=0, method="full")
    for v in (zipped, full):
        label_tokens(vlm, v)
    assert zipped.total_tokens < 4 * 8
    chat, chat_full = Chat(vlm, zipped), Chat(vlm, full)
    q = [{"role": "user", "text": "What is in this video ?"}]
    ids, ids_full = chat._ids(q), chat_full._ids(q)
    chat._asking, chat_full._asking = len(ids), len(ids_full)
    pos, pos_full = vlm.family.positions(chat, ids), vlm.family.positions(chat_full, ids_full)
    visual = [i for i, t in enumerate(ids) if t == chat.token_id]
    visual_full = [i for i, t in enumerate(ids_full) if t == chat.token_id]
    cells = zipped.grid[0] * zipped.grid[1]
    kept = [(u, k) for u in range(4) for k in range(8) if bool(zipped.keep[u, k])]
    assert len(visual) == len(kept)
    for at, (unit, slot) in zip(visual, kept):
        torch.testing.assert_close(pos[:, at],
                                   pos_full[:, visual_full[unit * cells + int(zipped.positions[unit, slot])]])
    assert chat.ask("What is in this video ?", GenerationConfig(max_new_tokens=4))


def test_a_chat_that_does_not_fit_thins_frames_and_revives_their_repeats(tiny_model_dir, clips):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clips["fast"], num_frames=24, dominant=6, contextual=2, temporal=True)
    chat = Chat(vlm, video, context=260)
    chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=8))
    assert "fitted to the context" in chat.note and len(chat.cached_ids) <= 260
    assert sum(1 for i in chat.cached_ids if i == chat.token_id) == chat.video.total_tokens


def test_dataclass_copies_keep_the_repeats(tiny_model_dir, clips):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clips["static"], num_frames=6, dominant=6, contextual=2, temporal=True)
    assert dataclasses.replace(video).total_tokens == video.total_tokens
    assert "repeats of earlier frames dropped" in video.summary() and "temporal 0.95: 1 segment," in video.summary()


def test_nodes_plan_encode_and_draw_with_the_temporal_stage(pack, tiny_model_dir, clips):
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu", quantization="none",
                                              attention="sdpa", keep_loaded=True, path=tiny_model_dir("llava"))[0]
    preview, _times, handle, _count = nodes["VisionZipLoadVideo"]().load(
        video="", mode="every", num_frames=8, fps=1.0, every=2, start=0.0, end=0.0, max_frames=0, max_size=0,
        preview_frames=4, backend="auto", path=clips["static"])
    frames, summary, planned = nodes["VisionZipFrameBudget"]().plan(
        token_budget=300, tokens_per_frame=8, reserved=0, model=model, video=handle, question="What happens ?",
        max_new_tokens=16, temporal=0.9)["result"]
    assert "temporal" in summary and planned.compression.temporal.budget and frames > 20
    # temporal from the plan
    out = nodes["VisionZipVideoToTokens"]().run(model=model, video=planned, method="visionzip", dominant=6,
                                                contextual=2, tokens_per_frame=0, batch_size=8)
    tokens = out["result"][0]
    assert tokens.repeats is not None and tokens.total_tokens <= planned.compression.temporal.budget
    answer = nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="What happens ?", timestamps=True,
                                               max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0)
    assert f"{tokens.total_tokens} visual tokens" in answer["ui"]["text"][0]
    attention, kept = nodes["VisionZipAttentionHeatmap"]().draw(tokens=tokens, images=preview)["result"]
    assert kept.shape[0] == 4 and kept.shape[1] > attention.shape[1] - 40  # legend band of the temporal kind
    off = nodes["VisionZipVideoToTokens"]().run(model=model, video=handle, method="visionzip", dominant=6, contextual=2,
                                                tokens_per_frame=0, batch_size=8)["result"][0]
    assert off.repeats is None
    # the threshold Frame Budget planned with travels with its plan (room enough: nothing tightened)
    roomy = nodes["VisionZipFrameBudget"]().plan(
        token_budget=0, tokens_per_frame=8, reserved=0, model=model, video=handle, question="What happens ?",
        max_new_tokens=16, temporal=0.5)["result"][2]
    loose = nodes["VisionZipVideoToTokens"]().run(model=model, video=roomy, method="visionzip", dominant=6,
                                                  contextual=2, tokens_per_frame=0, batch_size=8)["result"][0]
    assert loose.meta["temporal"]["threshold"] == 0.5 and "temporal 0.5:" in loose.summary()
    own = nodes["VisionZipVideoToTokens"]().run(model=model, video=roomy, method="visionzip", dominant=6,
                                                contextual=2, tokens_per_frame=0, batch_size=8,
                                                temporal=0.97)["result"][0]  # the node's own threshold wins
    assert own.meta["temporal"]["threshold"] == 0.97 and own.meta["temporal"]["budget"] == roomy.temporal.budget
    on = nodes["VisionZipVideoToTokens"]().run(model=model, video=handle, method="visionzip", dominant=6, contextual=2,
                                               tokens_per_frame=0, batch_size=8, temporal=0.9)["result"][0]
    assert on.total_tokens < off.total_tokens / 3


def test_command_line_temporal(tiny_model_dir, clips, capsys):
    from comfy_visionzip.__main__ import main

    code = main(["ask", "--model", tiny_model_dir("llava"), clips["static"], "What happens ?", "--every", "3",
                 "--dominant", "6", "--contextual", "2", "--temporal", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "repeats of earlier frames dropped" in out
    shown = int(out.split("visual tokens in the prompt: ")[1].split()[0])
    assert shown < 30 * 8 / 3
    assert main(["ask", "--model", tiny_model_dir("llava"), clips["static"], "What ?", "--temporal", "2.5"]) == 2
    assert "--temporal 2.5" in capsys.readouterr().err


@pytest.mark.needs_weights
def test_on_a_real_encoder_static_video_is_nearly_free_and_real_motion_costs_about_the_same(real_clip, tmp_path):
    from comfy_visionzip import sample_video
    from comfy_visionzip.vlm import load_tower
    from comfy_visionzip.weights import find_real_tower

    folder = find_real_tower()
    if folder is None:
        pytest.skip("real weights not fetched (python -m comfy_visionzip fetch-weights)")
    encoder = load_tower(folder, device="cpu", dtype="fp32")
    static = make_scene_clip(tmp_path / "static.mp4", motion="static", frames=300, size=(320, 180))
    share = {}
    for name, path, fps in (("static", static, 3.0), ("real", real_clip, 3.0)):
        frames = sample_video(path, fps=fps)
        video = compress_frames(encoder, [frames], dominant=54, contextual=10, temporal=True)
        share[name] = video.total_tokens / (video.num_frames * 64)
    assert share["static"] < 0.1  # the first frame, then one token a frame
    assert share["real"] > 0.8  # a handheld camera and people moving: nearly every token is new


def test_the_stage_runs_on_a_saved_tokens_file_too(tiny_model_dir, clips, tmp_path, capsys):
    from comfy_visionzip.__main__ import main

    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    path = save_tokens(compress_video(vlm, clips["static"], num_frames=12, dominant=6, contextual=2),
                       tmp_path / "plain")
    assert main(["ask", "--model", tiny_model_dir("llava"), "-", "What ?", "--tokens", path, "--temporal",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens in the prompt: 19" in out  # 8 + one a frame for the 11 static frames after the first
