"""Qwen2.5-VL and Qwen3-VL on tiny random checkpoints saved like real ones: exact to the model's own
forward with compression off (image and video), VisionZip's scores and selection on merged tokens, the
kept tokens' own 3D positions, DeepStack pruned to the kept tokens, chat, budget and tokens files."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from comfy_visionzip import VisionZipError, sample_video
from comfy_visionzip.answer import Chat, GenerationConfig
from comfy_visionzip.budget import plan_budget
from comfy_visionzip.pipeline import compress_frames, compress_video, label_tokens
from comfy_visionzip.store import load_tokens, save_tokens
from comfy_visionzip.testing.tiny import QWEN_FAMILIES
from comfy_visionzip.vlm import load_vlm

CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}
FAMILY = [pytest.param(f, marks=pytest.mark.skipif(not hasattr(transformers, CLASSES[f]),
                                                   reason=f"this transformers has no {CLASSES[f]}"))
          for f in QWEN_FAMILIES]
QUESTION = [{"role": "user", "text": "What is in this video ?"}]


@pytest.fixture(scope="module")
def clip(clip_factory):
    return clip_factory("qwen.mp4", frames=60, size=(96, 64), options={"g": "10"})


def _own_logits(vlm, ids, token_id, kind, rows, grid, spacing=None):
    """The model's own forward from pixel rows (its vision tower, scatter and rope index)."""
    input_ids = torch.tensor([ids])
    params = inspect.signature(vlm.model.forward).parameters
    kwargs = {"pixel_values_videos": rows, "video_grid_thw": grid} if kind == "video" else \
        {"pixel_values": rows, "image_grid_thw": grid}
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = (input_ids == token_id).int() * (2 if kind == "video" else 1)
    if kind == "video" and "second_per_grid_ts" in params:
        kwargs["second_per_grid_ts"] = torch.tensor([spacing])
    with torch.no_grad():
        return vlm.model(input_ids=input_ids, **kwargs).logits[0, -1].float()


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("count", [4, 5])  # 5: the odd last frame is repeated, as the processor does
def test_compression_off_matches_the_models_own_forward_for_a_video(family, count, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=count)
    video = compress_frames(encoder, [frames], dominant=1, contextual=0, method="full")
    label_tokens(vlm, video)
    units = (count + 1) // 2
    rows_, cols_ = video.grid
    assert video.tokens.shape[:2] == (units, rows_ * cols_) and video.num_frames == units
    times = list(frames.timestamps) + [frames.timestamps[-1]] * (count % 2)
    assert video.timestamps == pytest.approx([(times[i] + times[i + 1]) / 2 for i in range(0, len(times), 2)])
    if count == 4:  # sampled at 2 fps: two frames per temporal patch are 1 s apart (temporal_patch_size / fps)
        frames = sample_video(clip, fps=2.0, max_frames=4)
        video = compress_frames(encoder, [frames], dominant=1, contextual=0, method="full")
        label_tokens(vlm, video)
        assert Chat(vlm, video).family_state["cells"].spacing == 1.0
    chat = Chat(vlm, video)
    ids = chat._ids(QUESTION)
    ours, _, _ = chat.prefill(ids)
    rows, grid = encoder.preprocess(frames.frames)
    grid = torch.tensor([[units, int(grid[0, 1]), int(grid[0, 2])]])
    theirs = _own_logits(vlm, ids, chat.token_id, "video", rows, grid, spacing=chat.family_state["cells"].spacing)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    text = vlm.tokenizer.decode(ids)
    if family == "qwen3_vl":  # "<t seconds>" before every temporal patch
        assert text.count("seconds") == units and text.count("<|vision_start|>") == units
    else:
        assert "seconds" not in text and text.count("<|vision_start|>") == 1


@pytest.mark.parametrize("family", FAMILY)
def test_compression_off_matches_the_models_own_forward_for_an_image(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frame = sample_video(clip, num_frames=1).frames  # a picture: no times
    video = compress_frames(encoder, [frame], dominant=1, contextual=0, method="full")
    label_tokens(vlm, video)
    chat = Chat(vlm, video)
    assert chat.kind == "image" and chat.token_text == "<|image_pad|>"
    ids = chat._ids([{"role": "user", "text": "What is in this image ?"}])
    ours, _, _ = chat.prefill(ids)
    rows, grid = encoder.preprocess(frame)
    torch.testing.assert_close(ours, _own_logits(vlm, ids, chat.token_id, "image", rows, grid), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY)
def test_pixels_equal_the_checkpoints_own_image_processor(family, tiny_model_dir, clip):
    """A frame already at the processor's size gives the processor's pixel rows (patch order, normalisation)."""
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frame = sample_video(clip, num_frames=1).frames  # 64 x 96: resized to 60 x 96 (multiples of 12)
    name = next(n for n in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor") if hasattr(transformers, n))
    settings = {k: v for k, v in vlm.image_config.items() if not k.endswith("_type") and k != "size"}
    processor = getattr(transformers, name)(**settings)
    exact = frame[:, 2:62]  # 60 x 96: no resize needed
    theirs = processor(images=[exact[0].numpy()], return_tensors="pt")
    rows, grid = encoder.preprocess(exact)
    assert grid.tolist() == theirs["image_grid_thw"].tolist() == [[1, 10, 16]]
    torch.testing.assert_close(rows, theirs["pixel_values"].float(), atol=1e-5, rtol=0)
    resized = processor(images=[frame[0].numpy()], return_tensors="pt")  # PIL's bicubic vs torchvision's
    rows, grid = encoder.preprocess(frame)
    assert grid.tolist() == resized["image_grid_thw"].tolist()
    assert (rows - resized["pixel_values"]).abs().mean() < 0.02


def _merged_order(vlm, encoder, rows, grid):
    """The permutation from the tower's block order to the merger's (raster) output, found by matching rows:
    independent of how the encoder undoes the window order."""
    captured = {}
    block = encoder.block
    hooks = [block.register_forward_pre_hook(lambda m, a, k: captured.update(x=a[0] if a else k["hidden_states"],
                                                                              rope=k["position_embeddings"],
                                                                              cu=k["cu_seqlens"]), with_kwargs=True),
             block.register_forward_hook(
                 lambda m, a, out: captured.update(y=out[0] if isinstance(out, tuple) else out))]
    try:
        with torch.no_grad():
            out = encoder.tower(rows, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    pooled = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out.pooler_output
    with torch.no_grad():
        mine = encoder.tower.merger(captured["y"])  # merger rows in block order
    order = torch.cdist(pooled.float(), mine.float()).argmin(1)  # raster row r is block row order[r]
    torch.testing.assert_close(mine[order], pooled)
    return captured, order


@pytest.mark.parametrize("family", FAMILY)
def test_scores_are_the_last_blocks_attention_received_per_merged_token(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=4).frames
    rows, grid = encoder.preprocess(frames)
    encoded = encoder.encode(frames)
    captured, order = _merged_order(vlm, encoder, rows, grid)
    attn = encoder.block.attn
    x = encoder.block.norm1(captured["x"])
    seq = x.shape[0]
    q, k, _v = attn.qkv(x).reshape(seq, 3, encoder.num_heads, -1).unbind(1)
    module = __import__(type(attn).__module__, fromlist=["_"])
    cos, sin = captured["rope"]
    q, k = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
    received = torch.zeros(seq)
    bounds = captured["cu"].tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):  # eager softmax per image, whole
        logits = (torch.einsum("qhd,khd->hqk", q[start:stop].float(), k[start:stop].float())
                  * getattr(attn, "scaling", encoder.head_dim ** -0.5))
        received[start:stop] = logits.softmax(-1).sum(1).mean(0)
    reference = received.view(-1, 4).mean(1)[order].view(encoded.scores.shape)
    torch.testing.assert_close(encoded.scores, reference, rtol=1e-4, atol=1e-5)
    keys = k.float().mean(1).view(-1, 4, k.shape[-1]).mean(1)[order]
    torch.testing.assert_close(encoded.keys.reshape(-1, keys.shape[-1]), keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY)
def test_visionzip_tokens_keep_their_own_positions_and_generation_runs(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=6)
    full = compress_frames(encoder, [frames], dominant=1, contextual=0, method="full")
    zipped = compress_frames(encoder, [frames], dominant=6, contextual=2)
    for v in (full, zipped):
        label_tokens(vlm, v)
    assert zipped.tokens.shape[:2] == (3, 8) and zipped.positions.shape == (3, 8)
    cells = zipped.positions.long()
    assert bool((cells[:, 1:] > cells[:, :-1]).all())  # raster order, a contextual token at its target's cell
    # dominant tokens are exactly the merged tokens at their cells (the tower's own output)
    assignment = zipped.assignment.long()
    for u in range(3):
        for slot, cell in enumerate(cells[u].tolist()):
            if int(assignment[u, cell]) == slot and int((assignment[u] == slot).sum()) == 1:  # a dominant token
                torch.testing.assert_close(zipped.tokens[u, slot], full.tokens[u, cell])
    chat_full, chat = Chat(vlm, full), Chat(vlm, zipped)
    ids_full, ids = chat_full._ids(QUESTION), chat._ids(QUESTION)
    assert sum(1 for i in ids if i == chat.token_id) == 24  # exactly the planned visual tokens
    chat_full._asking, chat._asking = len(ids_full), len(ids)
    pos_full, pos = vlm.family.positions(chat_full, ids_full), vlm.family.positions(chat, ids)
    visual_full = [i for i, t in enumerate(ids_full) if t == chat.token_id]
    visual = [i for i, t in enumerate(ids) if t == chat.token_id]
    rows_, cols_ = zipped.grid
    for n, at in enumerate(visual):  # each kept token at the uncompressed model's position of its own cell
        unit, slot = divmod(n, 8)
        torch.testing.assert_close(pos[:, at], pos_full[:, visual_full[unit * rows_ * cols_ + int(cells[unit, slot])]])
    torch.testing.assert_close(pos[:, visual[-1] + 1:], pos_full[:, visual_full[-1] + 1:])  # the text after: unchanged
    answer = chat.ask("What is in this video ?", GenerationConfig(max_new_tokens=6))
    assert answer and chat.turns[0].new_tokens == 6
    generated = vlm.family.positions(chat, chat.cached_ids)[:, len(ids):]
    assert generated[0].tolist() == list(range(int(pos.max()) + 1, int(pos.max()) + 1 + generated.shape[1]))


@pytest.mark.parametrize("family", FAMILY)
def test_greedy_generation_with_compression_off_equals_the_models_generate(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=8)  # temporal positions reach past the grid's side
    video = compress_frames(encoder, [frames], dominant=1, contextual=0, method="full")
    label_tokens(vlm, video)
    chat = Chat(vlm, video)
    chat.ask("What is in this video ?", GenerationConfig(max_new_tokens=8))
    prompt = chat.turns[0].prefill_tokens
    ours = chat.conversation_ids[prompt:]
    rows, grid = encoder.preprocess(frames.frames)
    ids = torch.tensor([chat.conversation_ids[:prompt]])
    kwargs = {"pixel_values_videos": rows, "video_grid_thw": torch.tensor([[4, int(grid[0, 1]), int(grid[0, 2])]])}
    params = inspect.signature(vlm.model.forward).parameters
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = (ids == chat.token_id).int() * 2
    if "second_per_grid_ts" in params:
        kwargs["second_per_grid_ts"] = torch.tensor([chat.family_state["cells"].spacing])
    with torch.no_grad():
        out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(ours),
                                 do_sample=False, **kwargs)
    assert out[0, prompt:].tolist() == ours


@pytest.mark.skipif(not hasattr(transformers, "Qwen3VLForConditionalGeneration"), reason="needs Qwen3-VL")
def test_deepstack_features_are_pruned_to_exactly_the_kept_tokens(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("qwen3_vl"), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=4)
    rows, grid = encoder.preprocess(frames.frames)
    with torch.no_grad():
        own = encoder.tower(rows, grid_thw=grid)
    deep = own.deepstack_features if hasattr(own, "deepstack_features") else own[1]
    zipped = compress_frames(encoder, [frames], dominant=5, contextual=3)
    label_tokens(vlm, zipped)
    width, n_deep = encoder.width, len(deep)
    assert zipped.tokens.shape[-1] == width * (1 + n_deep) and n_deep == 2
    cells, assignment = zipped.positions.long(), zipped.assignment.long()
    per = int(grid[0, 1] * grid[0, 2]) // 4
    for u in range(2):
        for slot in range(8):
            members = (assignment[u] == slot).nonzero().flatten()
            for d in range(n_deep):
                feature = deep[d][u * per: (u + 1) * per]
                got = zipped.tokens[u, slot, width * (d + 1): width * (d + 2)]
                target = int(cells[u, slot])
                if len(members) == 1:  # dominant: the tower's own DeepStack feature of that merged token
                    torch.testing.assert_close(got, feature[target])
                else:  # contextual: its target + the mean of the tokens that joined it
                    others = [int(m) for m in members if int(m) != target]
                    torch.testing.assert_close(got, feature[target] + feature[others].mean(0), rtol=1e-4, atol=1e-5)
    chat = Chat(vlm, zipped)
    seen = {}
    lm = vlm.family.language_model(vlm)
    hook = lm.register_forward_pre_hook(lambda m, a, k: None if "k" in seen else seen.update(k=k), with_kwargs=True)
    try:
        chat.ask("What is in this video ?", GenerationConfig(max_new_tokens=3))
    finally:
        hook.remove()
    mask, embeds = seen["k"]["visual_pos_masks"], seen["k"]["deepstack_visual_embeds"]
    assert int(mask.sum()) == 16 and [e.shape[0] for e in embeds] == [16, 16]


@pytest.mark.parametrize("family", FAMILY)
def test_budget_counts_temporal_patches_and_tokens_files_round_trip(family, tiny_model_dir, clip, tmp_path):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    plan = plan_budget(vlm, clip, "What happens in this video ?", budget=120, num_frames=40, dominant=6, contextual=2,
                       max_new_tokens=16)
    assert plan.frames < 40 and plan.prompt_tokens + 16 <= 120
    assert plan.visual_tokens == -(-plan.frames // 2) * 8
    video = compress_video(vlm, plan.video, dominant=6, contextual=2)
    assert video.total_tokens == plan.visual_tokens
    chat = Chat(vlm, video)
    chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=4))
    assert chat.turns[0].prefill_tokens == plan.prompt_tokens
    path = save_tokens(video, tmp_path / "qwen")
    again = load_tokens(path, model=vlm)
    assert torch.equal(again.positions, video.positions) and again.grid == video.grid
    assert (Chat(vlm, again).ask("What happens in this video ?", GenerationConfig(max_new_tokens=4))
            == chat.turns[0].answer)
    other = load_vlm(tiny_model_dir("llava_onevision"), device="cpu")
    with pytest.raises(VisionZipError, match="they differ in: family"):
        load_tokens(path, model=other)


@pytest.mark.skipif(hasattr(transformers, "Qwen3VLForConditionalGeneration"), reason="this transformers has Qwen3-VL")
def test_qwen3_vl_on_an_older_transformers_says_to_upgrade(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(VisionZipError, match="upgrade transformers"):
        load_vlm(tmp_path, device="cpu")


@pytest.mark.parametrize("family", FAMILY)
def test_video_pixels_equal_the_checkpoints_own_video_processor(family, tiny_model_dir, clip):
    """With torchvision (ComfyUI installs it): the real video processor's pixel rows and grid, frames already
    at its size (the per-frame resize rule is ours: at most 768 merged tokens a frame, see models/_qwen.py)."""
    pytest.importorskip("torchvision")
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=4).frames[:, 2:62]  # 60 x 96: multiples of 12, no resize
    kind = vlm.video_config["video_processor_type"]
    settings = {k: v for k, v in vlm.video_config.items() if not k.endswith("_type") and k not in ("fps",)}
    processor = getattr(transformers, kind)(**settings)
    theirs = processor(videos=[frames.numpy()], do_sample_frames=False, return_tensors="pt")
    rows, grid = encoder.preprocess(frames)
    assert theirs["video_grid_thw"].tolist() == [[2, 10, 16]] and grid.tolist() == [[1, 10, 16]] * 2
    torch.testing.assert_close(rows, theirs["pixel_values_videos"].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILY)
def test_patch_attention_is_the_last_blocks_attention_from_one_merged_token(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=4).frames
    attention, cell = encoder.attention_from(frames, (0.3, 0.6))
    rows_, cols_ = encoder.patch_grid(frames)
    assert cell == int(0.6 * rows_) * cols_ + int(0.3 * cols_) and attention.shape == (2, rows_ * cols_)
    torch.testing.assert_close(attention.sum(1), torch.ones(2))  # a distribution over the frame's merged tokens
    rows, grid = encoder.preprocess(frames)
    captured, order = _merged_order(vlm, encoder, rows, grid)  # raster cell r is block group order[r]
    attn = encoder.block.attn
    x = encoder.block.norm1(captured["x"])
    q, k, _v = attn.qkv(x).reshape(x.shape[0], 3, encoder.num_heads, -1).unbind(1)
    q, k = __import__(type(attn).__module__, fromlist=["_"]).apply_rotary_pos_emb_vision(q, k, *captured["rope"])
    cells = rows_ * cols_
    for unit in range(2):
        group = int(order[unit * cells + cell])
        span = slice(unit * cells * 4, (unit + 1) * cells * 4)
        probs = torch.einsum("qhd,khd->hqk", q[group * 4: group * 4 + 4].float(), k[span].float())
        probs = (probs * encoder.scale).softmax(-1).mean((0, 1)).view(cells, 4).sum(-1)
        local = order[unit * cells: (unit + 1) * cells] - unit * cells
        torch.testing.assert_close(attention[unit], probs[local], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY)
def test_preview_nodes_draw_qwen_attention_on_frames_of_any_shape(family, pack, tiny_model_dir, clip):
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu", quantization="none",
                                              attention="sdpa", keep_loaded=True, path=tiny_model_dir(family))[0]
    images = sample_video(clip, num_frames=4).frames.float() / 255  # a ComfyUI IMAGE, 64 x 96
    heat, summary = nodes["VisionZipPatchAttention"]().draw(model=model, images=images, x=0.5, y=0.5)["result"]
    assert heat.shape[0] == 2 and heat.shape[2] > heat.shape[1] and "of a 8x5 grid" in summary  # wide, as the frames
    features = nodes["VisionZipEncodeFrames"]().encode(model=model, images=images, batch_size=4)[0]
    tokens = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=6, contextual=2,
                                                   tokens_per_frame=0)["result"][0]
    assert tokens.tokens.shape[:2] == (2, 8) and tokens.positions.shape == (2, 8)


@pytest.mark.parametrize("family", FAMILY)
def test_long_answers_never_say_a_placeholder(family, tiny_model_dir, clip):
    """Qwen configs name their placeholders image_token_id / video_token_id: a random model that would pick one
    (then crash on embedding it) must not be allowed to."""
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clip, num_frames=4, dominant=6, contextual=2)
    chat = Chat(vlm, video)
    assert set(chat.placeholder_ids) == {vlm.config["image_token_id"], vlm.config["video_token_id"]}
    for seed in range(3):
        chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=200, temperature=1.0, seed=seed))
        assert not set(chat.conversation_ids[chat.first_prompt_length:]) & set(chat.placeholder_ids)
        chat.ask("and then ?", GenerationConfig(max_new_tokens=60))


@pytest.mark.parametrize("family", FAMILY)
def test_a_chat_too_long_for_the_context_is_thinned_in_temporal_patches(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clip, num_frames=16, dominant=6, contextual=2)  # 8 temporal patches x 8 tokens
    chat = Chat(vlm, video, context=90)
    chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=8))
    assert "fitted to the context" in chat.note and chat.video.num_frames < 8
    assert len(chat.cached_ids) <= 90 and chat.video.positions.shape == (chat.video.num_frames, 8)
    assert sum(1 for i in chat.cached_ids if i == chat.token_id) == chat.video.num_frames * 8
    with pytest.raises(VisionZipError, match="strict|does not fit"):
        Chat(vlm, video, context=90, policy="strict").ask("What happens in this video ?",
                                                          GenerationConfig(max_new_tokens=8))
