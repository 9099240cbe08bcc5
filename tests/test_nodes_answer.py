"""Answer / Chat / Save Tokens / Load Tokens nodes."""

from __future__ import annotations

import pytest

GEN = dict(max_new_tokens=5, temperature=0.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def setup(pack, tiny_model_dir, clip_factory):
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu", quantization="none",
                                              attention="sdpa", keep_loaded=False, path=tiny_model_dir("llava_next_video"))[0]
    path = clip_factory("qa.mp4", frames=40, options={"g": "10"})
    handle = nodes["VisionZipLoadVideo"]().load(video="", mode="num_frames", num_frames=6, fps=1.0, every=1, start=0.0,
                                                end=0.0, max_frames=0, max_size=0, preview_frames=2, backend="auto",
                                                path=path)[2]
    tokens = nodes["VisionZipVideoToTokens"]().run(model=model, video=handle, method="visionzip", dominant=8,
                                                   contextual=2, tokens_per_frame=0, batch_size=4)["result"][0]
    return nodes, model, tokens


def test_answer_then_chat_reuses_the_cache_and_branches_safely(setup):
    nodes, model, tokens = setup
    out = nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="What happens ?", timestamps=True, **GEN)
    answer, state = out["result"]
    assert answer and "60 visual tokens" in out["ui"]["text"][0]
    first = nodes["VisionZipChat"]().chat(chat=state, question="and then ?", **GEN)
    second = nodes["VisionZipChat"]().chat(chat=state, question="and then ?", **GEN)
    a, s1 = first["result"]
    b, s2 = second["result"]
    assert a == b  # ComfyUI can run a node twice from the same input: the input chat is never mutated
    assert len(state.chat.turns) == 1 and len(s1.chat.turns) == 2
    turn = s1.chat.turns[-1]
    assert turn.cached_tokens >= state.chat.turns[0].prefill_tokens and turn.prefill_tokens < 15
    assert "reused" in first["ui"]["text"][0]
    assert model.vlm.device.type == "cpu"  # keep_loaded off: back on the offload device after each run


def test_save_and_load_tokens_nodes(setup, tmp_path):
    nodes, model, tokens = setup
    saved = nodes["VisionZipSaveTokens"]().save(tokens=tokens, filename_prefix=str(tmp_path / "clip"))["result"][0]
    assert saved.endswith("clip_00001.safetensors")
    again = nodes["VisionZipSaveTokens"]().save(tokens=tokens, filename_prefix=str(tmp_path / "clip"))["result"][0]
    assert again.endswith("clip_00002.safetensors")  # never overwrites
    loaded, summary = nodes["VisionZipLoadTokens"]().load(path=saved, model=model)
    assert loaded.total_tokens == tokens.total_tokens and "6 frames" in summary
    with pytest.raises(ValueError, match="tokens file not found"):
        nodes["VisionZipLoadTokens"]().load(path=str(tmp_path / "missing.safetensors"))
