"""Answering from compressed tokens on tiny random checkpoints of every family: splicing, templates,
the KV cache across turns, saving tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from comfy_visionzip import VisionZipError
from comfy_visionzip.answer import Chat, GenerationConfig, project
from comfy_visionzip.pipeline import compress_frames, compress_video, label_tokens
from comfy_visionzip.store import load_tokens, save_tokens
from comfy_visionzip.testing.tiny import ALL_FAMILIES, FAMILIES
from comfy_visionzip.vlm import load_vlm


@pytest.fixture(scope="module")
def clip(clip_factory):
    return clip_factory("answer.mp4", frames=60, size=(96, 64), options={"g": "10"})


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_clip_to_text_with_exact_token_count(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clip, num_frames=5, dominant=7, contextual=3)
    crops = 5 if family == "llava_next" else 1  # 96x64 frames -> the 96x96 anyres grid: base + 2x2 tiles
    assert video.tokens.shape[:2] == (5, crops * 10)
    chat = Chat(vlm, video)
    answer = chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=6))
    assert isinstance(answer, str) and answer
    ids = chat.cached_ids
    placeholders = sum(1 for i in ids if i == chat.token_id)
    extra = {"llava_onevision": 1, "llava_next": 5}.get(family, 0)  # image_newline: once per video / per frame
    assert placeholders == 5 * crops * 10 + extra
    assert chat.turns[0].prefill_tokens == len(ids) - chat.turns[0].new_tokens  # max_new_tokens reached: all cached


def _model_logits(vlm, ids, **pixels):
    with torch.no_grad():
        return vlm.model(input_ids=torch.tensor([ids]), **pixels).logits[0, -1].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_compression_off_matches_the_models_own_forward(family, tiny_model_dir, clip):
    """Our projected tokens spliced into inputs_embeds give the same next-token logits as the model's own
    forward from pixel values (its get_*_features + placeholder scatter): splicing and order are right."""
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    from comfy_visionzip import sample_video

    frames = sample_video(clip, num_frames=3)
    video = compress_frames(encoder, [frames], dominant=1, contextual=0, method="full")
    label_tokens(vlm, video)
    chat = Chat(vlm, video, timestamps=False)
    ids = chat._ids([{"role": "user", "text": "What is in this video ?"}])
    ours, _, _ = chat.prefill(ids)
    pixels = encoder.preprocess(frames.frames)
    if vlm.family.video_input == "video":
        theirs = _model_logits(vlm, ids, pixel_values_videos=pixels[None])
    elif family == "llava_next":  # anyres: (frames, crops, 3, S, S) and each frame's size
        height, width = frames.frames.shape[1:3]
        theirs = _model_logits(vlm, ids, pixel_values=pixels, image_sizes=torch.tensor([[height, width]] * 3))
    else:
        theirs = _model_logits(vlm, ids, pixel_values=pixels)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_prompt_equals_the_processors_for_llava(tiny_model_dir, clip):
    """The same ids as the checkpoint's own processor + chat template (one frame, no timestamps)."""
    from comfy_visionzip import sample_video

    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    frames = sample_video(clip, num_frames=1)
    video = compress_frames(vlm.video_encoder(), [frames], dominant=1, contextual=0, method="full")
    label_tokens(vlm, video)
    chat = Chat(vlm, video, timestamps=False)
    ours = chat._ids([{"role": "user", "text": "What is in this image ?"}])
    name = "CLIPImageProcessorPil" if hasattr(transformers, "CLIPImageProcessorPil") else "CLIPImageProcessor"
    image_processor = getattr(transformers, name)(**{k: v for k, v in vlm.image_config.items()
                                                     if not k.endswith("_type")})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=vlm.tokenizer, patch_size=6,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=chat.template)
    convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image ?"}]}]
    text = processor.apply_chat_template(convo, add_generation_prompt=True)
    theirs = processor(text=[text], images=[frames.frames[0].numpy()], return_tensors="pt")
    assert ours == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(vlm.video_encoder().preprocess(frames.frames), theirs["pixel_values"], atol=0.03, rtol=0)


def test_follow_up_reuses_the_cache_and_never_encodes_again(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("video_llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=8, dominant=12, contextual=4)
    tower = vlm.inner.video_tower
    calls = []
    handle = tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        chat = Chat(vlm, video)
        chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=5))
        first = chat.turns[0]
        chat.ask("Who is in the kitchen ?", GenerationConfig(max_new_tokens=5))
        second = chat.turns[1]
    finally:
        handle.remove()
    assert calls == []  # the chat never runs the vision tower: the tokens were made once
    assert first.cached_tokens == 0 and first.prefill_tokens > 8 * 16
    # the follow-up runs only its own text (closing the last answer + the new question), nothing visual
    question_ids = vlm.tokenizer("USER: Who is in the kitchen ? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert second.prefill_tokens <= len(question_ids) + 3
    assert second.cached_tokens >= first.prefill_tokens
    # and it is the same answer as asking the whole conversation from scratch
    fresh = Chat(vlm, video)
    fresh.messages = chat.messages[:2]
    assert fresh.ask("Who is in the kitchen ?", GenerationConfig(max_new_tokens=5)) == second.answer


def test_fork_branches_without_touching_the_original(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    chat = Chat(vlm, compress_video(vlm, clip, num_frames=3, dominant=6, contextual=2))
    chat.ask("What is in this video ?", GenerationConfig(max_new_tokens=4))
    length = chat.cache.get_seq_length()
    branch = chat.fork()
    branch.ask("and then ?", GenerationConfig(max_new_tokens=4))
    assert chat.cache.get_seq_length() == length and len(chat.turns) == 1
    assert branch.cache.get_seq_length() > length and len(branch.turns) == 2


def test_sampling_seed_stop_strings_and_streaming(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=2, dominant=6, contextual=2)
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    a = Chat(vlm, video).ask("What is in this video ?", sampled)
    b = Chat(vlm, video).ask("What is in this video ?", sampled)
    c = Chat(vlm, video).ask("What is in this video ?", GenerationConfig(max_new_tokens=8, temperature=1.5, seed=8))
    assert a == b and a != c
    pieces = []
    full = Chat(vlm, video).ask("What is in this video ?", GenerationConfig(max_new_tokens=8), on_text=pieces.append)
    assert "".join(pieces).strip() == full
    words = full.split()
    stopped = Chat(vlm, video).ask("What is in this video ?", GenerationConfig(max_new_tokens=8, stop=(words[2],)))
    assert stopped == " ".join(words[:2])
    with pytest.raises(VisionZipError, match="temperature must be between 0"):
        Chat(vlm, video).ask("q", GenerationConfig(temperature=-1))
    with pytest.raises(VisionZipError, match="the question is empty"):
        Chat(vlm, video).ask("   ")


def test_timestamps_reach_the_prompt(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=3, dominant=6, contextual=2)
    text = Chat(vlm, video).render([{"role": "user", "text": "When ?"}])
    assert "frame at 0.0 s:" in text and "frame at 1.0 s:" in text and "frame at 2.0 s:" in text
    vlm = load_vlm(tiny_model_dir("llava_onevision"), device="cpu")
    video = compress_video(vlm, clip, num_frames=3, dominant=6, contextual=2)
    text = Chat(vlm, video).render([{"role": "user", "text": "When ?"}])
    assert ("The video lasts for 2.00 seconds, and 3 frames are sampled from it. "
            "These frames are located at 0.00s, 1.00s, 1.97s.") in text


def test_save_and_load_tokens(tiny_model_dir, clip, tmp_path):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=4, dominant=6, contextual=2)
    path = save_tokens(video, tmp_path / "talk")
    assert path.endswith(".safetensors")
    again = load_tokens(path, model=vlm)
    assert torch.equal(again.tokens, video.tokens) and again.timestamps == video.timestamps
    assert again.indices == video.indices and (again.dominant, again.contextual, again.method) == (6, 2, "visionzip")
    assert again.preprocess == video.preprocess and torch.equal(again.assignment, video.assignment)
    assert Chat(vlm, again).ask("What ?", GenerationConfig(max_new_tokens=4)) == Chat(vlm, video).ask(
        "What ?", GenerationConfig(max_new_tokens=4))
    other = load_vlm(tiny_model_dir("video_llava"), device="cpu")
    with pytest.raises(VisionZipError, match=r"these tokens were made with llava \(llava, vision width 32\)"):
        load_tokens(path, model=other)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(VisionZipError, match="not a safetensors file"):
        load_tokens(tmp_path / "junk.safetensors")


def test_projection_of_compressed_tokens_is_the_projector(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=2, dominant=6, contextual=2)
    with torch.no_grad():
        expected = vlm.inner.multi_modal_projector(video.tokens).reshape(-1, 32)
    torch.testing.assert_close(project(vlm, video), expected)
    assert np.isfinite(project(vlm, video).numpy()).all()


def test_cancelling_generation_leaves_the_chat_usable(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    chat = Chat(vlm, compress_video(vlm, clip, num_frames=2, dominant=6, contextual=2))
    first = chat.ask("What is in this video ?", GenerationConfig(max_new_tokens=4))

    class Cancelled(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        chat.ask("and then ?", GenerationConfig(max_new_tokens=6), progress=stop)
    assert len(chat.turns) == 1 and chat.messages[-1]["text"] == first
    again = chat.ask("and then ?", GenerationConfig(max_new_tokens=6))
    reference = Chat(vlm, chat.video)
    reference.messages = chat.messages[:2]
    assert again == reference.ask("and then ?", GenerationConfig(max_new_tokens=6))


AVAILABLE = [f for f in ALL_FAMILIES if f != "qwen3_vl" or hasattr(transformers, "Qwen3VLForConditionalGeneration")]


@pytest.mark.parametrize("family", AVAILABLE)
def test_a_follow_up_prefills_only_its_own_new_text_for_every_family(family, tiny_model_dir, clip):
    """The conversation is kept as token ids: the previous answer is never re-tokenised and re-run."""
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    # 8 frames: Qwen2.5-VL's temporal positions reach past the grid's side (where transformers 5's rope index
    # and generate() continue differently: the follow-up must still agree with a fresh prefill)
    video = compress_video(vlm, clip, num_frames=8, dominant=6, contextual=2)
    chat = Chat(vlm, video)
    chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=12))
    seen = list(chat.conversation_ids)
    assert len(seen) == chat.turns[0].prefill_tokens + min(chat.turns[0].new_tokens, 12)
    assert chat._followup_ids([*chat.messages, {"role": "user", "text": "Who is in the kitchen ?"}])[:len(seen)] == seen
    chat.ask("Who is in the kitchen ?", GenerationConfig(max_new_tokens=4))
    second = chat.turns[1]
    assert second.cached_tokens == len(seen)  # everything the model saw, the generated answer included
    question = vlm.tokenizer("Who is in the kitchen ?", add_special_tokens=False)["input_ids"]
    assert second.prefill_tokens <= len(question) + 12  # the turn's own text and the template around it
    # the same ids from scratch (no cache) give the same answer: the cache is consistent
    fresh = Chat(vlm, video)
    fresh.messages, fresh.turns, fresh.conversation_ids = chat.messages[:2], chat.turns[:1], seen
    assert fresh.ask("Who is in the kitchen ?", GenerationConfig(max_new_tokens=4)) == second.answer
    assert fresh.turns[-1].cached_tokens == 0


def test_tokens_of_another_tower_of_the_same_family_and_width_are_refused(tiny_model_dir, clip, tmp_path):
    from comfy_visionzip.testing.tiny import build_tiny

    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")  # 48 px, patch 6: an 8x8 grid
    coarse = load_vlm(build_tiny("llava", tmp_path / "coarse", image_size=48, patch=12), device="cpu")  # 4x4
    video = compress_video(coarse, clip, num_frames=2, dominant=6, contextual=2)
    assert video.tokens.shape[-1] == 32  # the same width: only the recorded identity tells them apart
    path = save_tokens(video, tmp_path / "coarse-tokens")
    with pytest.raises(VisionZipError, match=r"they differ in: patch grid 4x4 vs 8x8; vision tower config"):
        load_tokens(path, model=vlm)
    with pytest.raises(VisionZipError, match="patch grid 4x4 vs 8x8"):
        Chat(vlm, video)
    assert load_tokens(path, model=coarse).num_frames == 2
