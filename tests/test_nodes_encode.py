"""Model, encode, compress and preview nodes on tiny random checkpoints, called as ComfyUI calls them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from comfy_visionzip import VisionZipError
from comfy_visionzip.vlm import load_vlm


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


def _model(nodes, folder):
    return nodes["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu", quantization="none",
                                             attention="sdpa", keep_loaded=True, path=folder)[0]


def test_image_batch_encode_compress_heatmap(nodes, tiny_model_dir):
    model = _model(nodes, tiny_model_dir("llava"))
    images = torch.rand(3, 40, 60, 3)
    features = nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=2, images=images,
                                                       timestamps="0.0, 1.5, 3.0")[0]
    assert features.encoded.hidden.shape == (3, 65, 32) and features.encoded.timestamps == [0.0, 1.5, 3.0]
    out = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=9, contextual=3,
                                                tokens_per_frame=0)
    tokens, summary = out["result"]
    assert tokens.tokens.shape == (3, 12, 32) and tokens.total_tokens == 36
    assert "3 frames x 12 tokens = 36 visual tokens" in summary and out["ui"]["text"] == [summary]
    # the paper's ratio from a single number
    tokens64 = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=1, contextual=0,
                                                     tokens_per_frame=64)["result"][0]
    assert (tokens64.dominant, tokens64.contextual) == (54, 10)
    full = nodes["VisionZipCompress"]().compress(features=features, method="full", dominant=1, contextual=0,
                                                 tokens_per_frame=0)["result"][0]
    assert full.tokens.shape == (3, 64, 32)  # LLaVA drops CLS: every patch
    heat, kept = nodes["VisionZipAttentionHeatmap"]().draw(tokens=tokens, images=images)["result"]
    # shown 7x larger (48 -> 336 px, nearest: patch borders sharp) with a legend band under each picture
    assert heat.shape[0] == kept.shape[0] == 3 and heat.shape[2] == kept.shape[2] == 336
    assert heat.shape[1] > 336 and 0 <= float(heat.min()) and float(heat.max()) <= 1
    # dominant patches are drawn as they are, merged ones tinted: the images differ where merged
    view = torch.from_numpy(np.asarray(features.views, dtype=np.float32)) / 255
    shown = kept[:, :336].reshape(3, 48, 7, 48, 7, 3)[:, :, 0, :, 0]  # undo the 7x enlargement
    assert not torch.allclose(shown, view)


def test_video_to_tokens_streams_the_plan(nodes, tiny_model_dir, clip_factory):
    model = _model(nodes, tiny_model_dir("llava_onevision"))
    path = clip_factory("n.mp4", frames=45, options={"g": "10"})
    _image, _ts, handle, count = nodes["VisionZipLoadVideo"]().load(
        video="", mode="every", num_frames=1, fps=1.0, every=5, start=0.0, end=0.0, max_frames=0, max_size=0,
        preview_frames=3, backend="auto", path=path)
    out = nodes["VisionZipVideoToTokens"]().run(model=model, video=handle, method="visionzip", dominant=10,
                                                contextual=2, tokens_per_frame=0, batch_size=4)
    tokens = out["result"][0]
    assert count == 9 and tokens.num_frames == 9 and tokens.tokens_per_frame == 12
    assert tokens.indices == list(range(0, 45, 5)) and tokens.timestamps[1] == pytest.approx(5 / 30, abs=1e-3)
    assert tokens.cls_token is False  # SigLIP
    heat, kept = nodes["VisionZipAttentionHeatmap"]().draw(tokens=tokens, images=_image)["result"]
    assert heat.shape[0] == 3 and heat.shape[2] == 336 and heat.shape[1] > 336


def test_encode_frames_needs_exactly_one_input(nodes, tiny_model_dir):
    model = _model(nodes, tiny_model_dir("llava"))
    with pytest.raises(ValueError, match="exactly one of 'images' or 'video'"):
        nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=2)
    with pytest.raises(ValueError, match="2 timestamps for 3 frames"):
        nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=2, images=torch.rand(3, 32, 32, 3),
                                                timestamps="0, 1")


def test_load_vlm_rejects_wrong_folders(tmp_path, tiny_model_dir):
    with pytest.raises(VisionZipError, match="no config.json, so not a Hugging Face model folder"):
        load_vlm(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(VisionZipError,
                       match=r"model_type 'bert' \(BertModel\) is not supported; supported: LLaVA-1.5 \(llava\)"):
        load_vlm(str(tmp_path))
    with pytest.raises(VisionZipError, match="no such model folder"):
        load_vlm(str(tmp_path / "nope"))
    # pickled weights only: refused unless allowed
    folder = tmp_path / "pickled"
    src = tiny_model_dir("llava")
    os.makedirs(folder)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            (folder / name).write_bytes((open(os.path.join(src, name), "rb")).read())
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(VisionZipError, match=r"no \.safetensors weights \(found pickled \['pytorch_model.bin'\]\)"):
        load_vlm(str(folder))
    with pytest.raises(VisionZipError, match="unknown dtype 'fp8'"):
        load_vlm(src, dtype="fp8")
    with pytest.raises(VisionZipError, match="needs a CUDA GPU"):
        load_vlm(src, device="cpu", quantization="4bit")


def test_patch_attention_is_the_select_layers_row_of_that_patch(pack, tiny_model_dir):
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    encoder = vlm.video_encoder()
    images = torch.rand(2, 40, 56, 3)
    attention, patch = encoder.attention_from(images, (0.8, 0.3))
    rows, cols = encoder.grid
    assert patch == int(0.3 * rows) * cols + int(0.8 * cols)
    # reference: the layer's own input, its layer norm and projections, full softmax attention, mean over heads
    pixels = encoder.preprocess(images)
    with torch.no_grad():
        states = encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[encoder.layer_index]
        x = encoder.layer.layer_norm1(states)
        q, k = encoder.query(x), encoder.key(x)
    B, S, D = q.shape
    H = encoder.num_heads
    q = q.view(B, S, H, -1).transpose(1, 2)
    k = k.view(B, S, H, -1).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * encoder.scale).softmax(-1).mean(1)  # (B, S, S)
    torch.testing.assert_close(attention, probs[:, patch + 1, 1:], rtol=1e-4, atol=1e-6)
    assert attention.shape == (2, rows * cols) and torch.all(attention.sum(1) < 1)  # CLS took the rest

    model = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu",
                                                                 quantization="none", attention="sdpa",
                                                                 keep_loaded=True, path=tiny_model_dir("llava"))[0]
    out = pack.NODE_CLASS_MAPPINGS["VisionZipPatchAttention"]().draw(model=model, images=images, x=0.8, y=0.3)
    picture, summary = out["result"]
    assert picture.shape[0] == 2 and picture.shape[2] == 336 and "its 10 most attended patches get" in summary
    with pytest.raises(ValueError, match="fractions of the frame in 0..1"):
        encoder.attention_from(images, (1.5, 0.2))


def test_a_bare_tower_feeds_encode_compress_and_the_previews_but_cannot_answer(pack, tmp_path):
    import json

    import transformers

    folder = tmp_path / "tiny-dinov2"
    torch.manual_seed(0)
    transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=56, patch_size=14,
        num_register_tokens=2)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}, "do_center_crop": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    nodes = pack.NODE_CLASS_MAPPINGS
    out = nodes["VisionZipLoadTower"]().load(tower="", device="cpu", path=str(folder))
    model = out["result"][0]
    assert "Dinov2WithRegistersModel, 3 layers, select layer 1, 4x4 patches" in out["ui"]["text"][0]
    images = torch.rand(2, 64, 80, 3)
    features = nodes["VisionZipEncodeFrames"]().encode(model=model, batch_size=2, images=images)[0]
    assert features.encoded.hidden.shape == (2, 17, 32)  # CLS + 16 patches: the 2 registers are not tokens
    tokens = nodes["VisionZipCompress"]().compress(features=features, method="visionzip", dominant=4, contextual=2,
                                                   tokens_per_frame=0)["result"][0]
    heat, kept = nodes["VisionZipAttentionHeatmap"]().draw(tokens=tokens, features=features)["result"]
    assert heat.shape[0] == 2 and kept.shape[0] == 2
    picture = nodes["VisionZipPatchAttention"]().draw(model=model, images=images, x=0.5, y=0.5)["result"][0]
    assert picture.shape[0] == 2
    with pytest.raises(ValueError, match="is a bare vision tower: it has no language model"):
        nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="q", max_new_tokens=2, temperature=0.0,
                                          top_p=1.0, seed=0, timestamps=False)
    assert nodes["VisionZipLoadTower"].VALIDATE_INPUTS(tower="missing-tower").startswith("tower folder 'missing-tower'")
