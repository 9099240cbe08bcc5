"""Answer / Chat / Save Tokens / Load Tokens nodes."""

from __future__ import annotations

import os
import sys

import pytest

GEN = dict(max_new_tokens=5, temperature=0.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def setup(pack, tiny_model_dir, clip_factory):
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu", quantization="none",
                                              attention="sdpa", keep_loaded=False,
                                              path=tiny_model_dir("llava_next_video"))[0]
    path = clip_factory("qa.mp4", frames=40, options={"g": "10"})
    handle = nodes["VisionZipLoadVideo"]().load(video="", mode="num_frames", num_frames=6, fps=1.0, every=1, start=0.0,
                                                end=0.0, max_frames=0, max_size=0, preview_frames=2, backend="auto",
                                                path=path)[2]
    tokens = nodes["VisionZipVideoToTokens"]().run(model=model, video=handle, method="visionzip", dominant=8,
                                                   contextual=2, tokens_per_frame=0, batch_size=4)["result"][0]
    return nodes, model, tokens


def test_answer_then_chat_reuses_the_cache_and_branches_safely(setup):
    nodes, model, tokens = setup
    out = nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="What happens ?", timestamps=True,
                                            **GEN)
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


def test_save_and_load_tokens_nodes(pack, setup, tmp_path):
    nodes, model, tokens = setup
    comfy = sys.modules[pack.__name__ + ".nodes._comfy"]
    comfy.set_output_directory(str(tmp_path))  # ComfyUI's output folder (the headless runner's --out)
    try:
        saved = nodes["VisionZipSaveTokens"]().save(tokens=tokens, filename_prefix="clip")["result"][0]
        assert saved.endswith("clip_00001.safetensors") and saved.startswith(str(tmp_path))
        again = nodes["VisionZipSaveTokens"]().save(tokens=tokens, filename_prefix="clip")["result"][0]
        assert again.endswith("clip_00002.safetensors")  # never overwrites
        loaded, summary = nodes["VisionZipLoadTokens"]().load(path=saved, model=model)
        assert loaded.total_tokens == tokens.total_tokens and "6 frames" in summary
        with pytest.raises(ValueError, match="tokens file not found"):
            nodes["VisionZipLoadTokens"]().load(path=str(tmp_path / "missing.safetensors"))
    finally:
        comfy.set_output_directory(None)


def test_frame_budget_with_the_model_plans_exactly_what_answer_prefills(pack, setup, clip_factory):
    nodes, model, _tokens = setup
    path = clip_factory("qa.mp4", frames=40, options={"g": "10"})
    handle = nodes["VisionZipLoadVideo"]().load(video="", mode="every", num_frames=6, fps=1.0, every=1, start=0.0,
                                                end=0.0, max_frames=0, max_size=0, preview_frames=2, backend="auto",
                                                path=path)[2]
    question = "What happens ?"
    out = nodes["VisionZipFrameBudget"]().plan(token_budget=400, tokens_per_frame=10, reserved=0, max_frames=0,
                                               model=model, video=handle, question=question, max_new_tokens=5,
                                               policy="fit")
    frames, summary, fitted = out["result"]
    assert 1 <= frames < 40 and len(fitted.video.plan()[0]) == frames and "of the 40 asked frames are kept" in summary
    tokens, said = nodes["VisionZipVideoToTokens"]().run(model=model, video=fitted, method="visionzip", dominant=9,
                                                         contextual=1, tokens_per_frame=10, batch_size=0)["result"]
    # the page shows the file's name, not where it lies on disk
    assert f" of {os.path.basename(tokens.source)} x " in said and os.path.dirname(tokens.source) not in said
    answer = nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question=question, timestamps=True, **GEN)
    prompt = int(summary.split("; prompt ")[1].split(" ")[0])
    assert f"prefilled {prompt} new tokens" in answer["ui"]["text"][0]  # planned == prefilled, to the token
    with pytest.raises(ValueError, match="the plan does not fit"):
        nodes["VisionZipFrameBudget"]().plan(token_budget=400, tokens_per_frame=10, model=model, video=handle,
                                             question=question, max_new_tokens=5, policy="strict")
    with pytest.raises(ValueError, match="a token budget of 0 means the model's context: connect a model and a video"):
        nodes["VisionZipFrameBudget"]().plan(token_budget=0, tokens_per_frame=10)
    with pytest.raises(ValueError, match="a token budget of 0 means the model's context: connect a video$"):
        nodes["VisionZipFrameBudget"]().plan(token_budget=0, tokens_per_frame=10, model=model)
    capped = nodes["VisionZipFrameBudget"]().plan(token_budget=8000, tokens_per_frame=64, model=model,
                                                  max_new_tokens=96)
    assert capped["result"][0] == (4096 - 96) // 64 and "capped at the context of 4096" in capped["result"][1]
    with pytest.raises(ValueError, match="no video: Frame Budget's video output is empty"):
        nodes["VisionZipVideoToTokens"]().run(model=model, video=None, method="visionzip", dominant=9, contextual=1,
                                              tokens_per_frame=0, batch_size=0)


def test_answer_node_fits_or_refuses_tokens_over_the_context(setup):
    nodes, model, tokens = setup
    model.vlm.config["text_config"]["max_position_embeddings"] = 60  # this loaded copy only; restored below
    try:
        out = nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="What happens ?", timestamps=True,
                                                follow_up_reserve=0, **GEN)
        assert "fitted to the context" in out["ui"]["text"][0] and "context 60" in out["ui"]["text"][0]
        with pytest.raises(ValueError, match="the video does not fit"):
            nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="What happens ?", timestamps=True,
                                              policy="strict", follow_up_reserve=0, **GEN)
    finally:
        model.vlm.config["text_config"]["max_position_embeddings"] = 4096


def test_model_list_finds_checkpoints_one_level_down_in_other_packs_folders(pack, monkeypatch, tmp_path):
    """Qwen packs keep models/LLM/Qwen-VL/<checkpoint>: listed as 'Qwen-VL/<checkpoint>' and resolved back;
    only supported families are listed."""
    import sys
    import types

    configs = {"visionzip/tiny-llava": '{"model_type": "llava"}', "LLM/Qwen-VL/Qwen2.5-VL-3B-Instruct":
               '{"model_type": "qwen2_5_vl"}', "LLM/Qwen3-8B": '{"model_type": "qwen3"}', "LLM/broken": "{not json",
               "LLM/notes": None}
    for where, text in configs.items():
        (tmp_path / where).mkdir(parents=True)
        if text:
            (tmp_path / where / "config.json").write_text(text)
    registered: dict = {}
    fake = types.SimpleNamespace(models_dir=str(tmp_path), folder_names_and_paths=registered,
                                 add_model_folder_path=lambda name, path: registered.setdefault(name, [path]),
                                 get_folder_paths=lambda name: registered[name])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    comfy = sys.modules[pack.__name__ + ".nodes._comfy"]
    # a text LLM of another pack is left out; an unreadable config is listed (picking it says what is wrong)
    assert comfy.list_model_folders() == ["tiny-llava", "Qwen-VL/Qwen2.5-VL-3B-Instruct", "broken"]
    assert comfy.resolve_model("Qwen-VL/Qwen2.5-VL-3B-Instruct") == str(tmp_path / "LLM/Qwen-VL/Qwen2.5-VL-3B-Instruct")
