"""Model memory comes back (issue 17): node outputs that ComfyUI keeps between runs (model handles, tokens,
conversations) never keep a model in memory once it is let go ("Unload models", /free, keep_loaded off, a replaced
output); a conversation kept for follow-ups holds no model and keeps its KV cache off the GPU, and still reuses it.

The ComfyUI side (its ModelPatcher, load_models_gpu, /free) is checked in a real ComfyUI (see the issue's closing
note); these tests pin the pack's own bookkeeping, which works the same with and without ComfyUI."""

from __future__ import annotations

import gc
import sys
import threading
import weakref

import pytest
import torch

GEN = dict(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def setup(pack, tiny_model_dir, clip_factory):
    nodes = pack.NODE_CLASS_MAPPINGS
    path = clip_factory("memory.mp4", frames=30, options={"g": "10"})
    video = nodes["VisionZipLoadVideo"]().load(video="", mode="num_frames", num_frames=4, fps=1.0, every=1, start=0.0,
                                               end=0.0, max_frames=0, max_size=0, preview_frames=1, backend="auto",
                                               path=path)[2]
    return pack, nodes, video


@pytest.fixture
def models(pack):
    module = sys.modules[f"{pack.__name__}.nodes.model"]
    yield module
    module.free_models()
    sys.modules[f"{pack.__name__}.nodes._comfy"].run_pending()
    gc.collect()


@pytest.fixture
def loads(models, monkeypatch):
    """How many times a checkpoint was read from disk."""
    count = {"n": 0}
    real = models.load_vlm

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_vlm", counting)
    return count


def _load(nodes, folder, keep_loaded=True, dtype="fp32"):
    return nodes["VisionZipLoadVLM"]().load(model="", dtype=dtype, device="cpu", quantization="none",
                                            attention="sdpa", keep_loaded=keep_loaded, path=folder)[0]


def _tokens(nodes, handle, video):
    return nodes["VisionZipVideoToTokens"]().run(model=handle, video=video, method="visionzip", dominant=4,
                                                 contextual=2, tokens_per_frame=0, batch_size=4)["result"][0]


def _answer(nodes, handle, tokens, question="What happens ?"):
    return nodes["VisionZipAnswer"]().answer(model=handle, tokens=tokens, question=question, timestamps=True,
                                             **GEN)["result"]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_unloading_frees_the_model_while_every_output_stays_usable(setup, models, loads, tiny_model_dir, family):
    _pack, nodes, video = setup
    handle = _load(nodes, tiny_model_dir(family))
    tokens = _tokens(nodes, handle, video)
    answer, state = _answer(nodes, handle, tokens)
    assert loads["n"] == 1  # one load for Load VLM, Video to Tokens and Answer
    ref = weakref.ref(handle.vlm)
    models.free_models()  # what ComfyUI's unload does to the pack's model ("Unload models", POST /free)
    gc.collect()
    assert ref() is None, "a node output (handle, tokens or chat) still holds the model"
    assert not models._LOADED
    # the outputs ComfyUI keeps still work: the model is read again, and the parked KV cache is reused
    follow = nodes["VisionZipChat"]().chat(chat=state, question="and then ?", **GEN)["result"][1]
    assert loads["n"] == 2
    turn = follow.chat.turns[-1]
    assert turn.cached_tokens >= state.chat.turns[0].prefill_tokens and turn.prefill_tokens < 15
    # and it answers as a conversation that never left memory
    same = _answer(nodes, handle, tokens)[1]
    kept = nodes["VisionZipChat"]().chat(chat=same, question="and then ?", **GEN)["result"]
    assert kept[0] == follow.chat.turns[-1].answer


def test_keep_loaded_off_frees_when_the_run_ends_not_between_nodes(setup, models, loads, tiny_model_dir, pack):
    _pack, nodes, video = setup
    comfy = sys.modules[f"{pack.__name__}.nodes._comfy"]
    handle = _load(nodes, tiny_model_dir("llava"), keep_loaded=False)
    ref = weakref.ref(handle.vlm)
    tokens = _tokens(nodes, handle, video)
    _answer(nodes, handle, tokens)
    assert loads["n"] == 1 and ref() is not None  # the run is not over: every node used the one load
    comfy.run_pending()  # the end of the run (ComfyUI: its queue is idle; the headless runner: its last node)
    gc.collect()
    assert ref() is None and not models._LOADED
    _tokens(nodes, handle, video)  # the next run reads it again
    assert loads["n"] == 2


def test_keep_loaded_on_stays_across_runs(setup, models, loads, tiny_model_dir, pack):
    _pack, nodes, video = setup
    handle = _load(nodes, tiny_model_dir("llava"))
    first = handle.vlm
    for _ in range(2):
        _tokens(nodes, handle, video)
        sys.modules[f"{pack.__name__}.nodes._comfy"].run_pending()
    assert handle.vlm is first and loads["n"] == 1


def test_a_replaced_output_frees_its_model(setup, models, tiny_model_dir):
    """ComfyUI drops a node's old output when the node runs with new inputs (or /free clears its cache): when no
    handle for a model is left, nothing can ask for it, and the pack lets go of it."""
    _pack, nodes, video = setup
    handle = _load(nodes, tiny_model_dir("llava"))
    state = _answer(nodes, handle, _tokens(nodes, handle, video))[1]
    ref = weakref.ref(handle.vlm)
    del handle
    gc.collect()
    assert ref() is not None  # the conversation still holds a handle: a follow-up may come
    del state
    gc.collect()
    assert ref() is None and not models._LOADED


def test_another_model_makes_the_idle_one_go_first(setup, models, tiny_model_dir):
    _pack, nodes, video = setup
    one = _load(nodes, tiny_model_dir("llava"))
    ref = weakref.ref(one.vlm)
    two = _load(nodes, tiny_model_dir("llava_onevision"))
    gc.collect()
    assert ref() is None and len(models._LOADED) == 1 and two.vlm.family.model_type == "llava_onevision"
    assert one.vlm.family.model_type == "llava"  # the first handle still works: it reads its model again


def test_a_kept_conversation_holds_no_model_and_its_cache_waits_on_the_cpu(setup, models, tiny_model_dir):
    _pack, nodes, video = setup
    handle = _load(nodes, tiny_model_dir("qwen2_5_vl"))
    state = _answer(nodes, handle, _tokens(nodes, handle, video))[1]
    chat = state.chat
    assert chat.parked
    with pytest.raises(ValueError, match="parked"):
        chat.ask("and then ?")
    layers = handle.vlm.model.config.get_text_config().num_hidden_layers
    cached = _cache_tensors(chat.cache)
    assert len(cached) == 2 * layers and cached[0].shape[-2] == len(chat.cached_ids)
    tensors = [chat.visual, *cached, *_all_tensors(chat.family_state)]
    assert all(t.device.type == "cpu" for t in tensors)


def test_a_conversation_resumes_only_with_the_model_that_made_its_cache(setup, models, tiny_model_dir):
    _pack, nodes, video = setup
    folder = tiny_model_dir("llava")
    handle = _load(nodes, folder)
    chat = _answer(nodes, handle, _tokens(nodes, handle, video))[1].chat.fork()
    other = _load(nodes, folder, dtype="bf16").vlm
    with pytest.raises(ValueError, match=r"held by .*\(float32\); resume it with that model, not .*\(bfloat16\)"):
        chat.resume(other)


def test_after_run_waits_for_an_idle_queue(pack, monkeypatch):
    comfy = sys.modules[f"{pack.__name__}.nodes._comfy"]
    idle = {"now": False}
    monkeypatch.setattr(comfy, "queue_idle", lambda: idle["now"])
    monkeypatch.setattr(comfy.time, "sleep", lambda _s: done.wait(0.01))
    done = threading.Event()
    ran = []
    comfy.after_run(lambda: ran.append(1), "work")
    comfy.after_run(lambda: ran.append(2), "work")  # the same work waits once
    done.wait(0.2)
    assert ran == []  # a prompt is running: nothing is freed under it
    idle["now"] = True
    for _ in range(200):
        if ran:
            break
        done.wait(0.01)
    assert ran == [2]
    for _ in range(200):
        if not comfy._WATCHER:
            break
        done.wait(0.01)
    assert not comfy._WATCHER  # the thread ends when no work waits


def _cache_tensors(cache) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers 5
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [*cache.key_cache, *cache.value_cache]  # transformers 4


def _all_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _all_tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in _all_tensors(getattr(value, name))]
    return []


def test_encoded_frames_kept_by_comfyui_hold_no_model(setup, models, loads, tiny_model_dir):
    """Encode Frames' output stays in ComfyUI's cache: it must not keep the vision tower alive (the encoder is asked
    of the model handle when compressing, after an unload too)."""
    _pack, nodes, video = setup
    handle = _load(nodes, tiny_model_dir("llava"))
    features = nodes["VisionZipEncodeFrames"]().encode(model=handle, batch_size=4, video=video)
    features = features["result"][0] if isinstance(features, dict) else features[0]
    tower = weakref.ref(handle.vlm.video_encoder().tower)
    before = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=4, contextual=2,
                                                   tokens_per_frame=0)["result"][0]
    models.free_models()
    gc.collect()
    assert tower() is None, "the encoded frames still hold the vision tower"
    after = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=4, contextual=2,
                                                  tokens_per_frame=0)["result"][0]
    assert loads["n"] == 2 and torch.equal(before.tokens, after.tokens)
