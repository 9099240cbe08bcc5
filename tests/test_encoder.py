"""The encoder: hooks give the same scores/keys as eager attention, hidden states equal the model's own
feature path, preprocessing matches the checkpoint's processor, streaming keeps only compressed tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from comfy_visionzip import VisionZipError
from comfy_visionzip.encoder import VisionEncoder
from comfy_visionzip.pipeline import compress_frames
from comfy_visionzip.preprocess import Preprocess, preprocess_frames
from comfy_visionzip.testing.tiny import FAMILIES
from comfy_visionzip.vlm import load_vlm
from comfy_visionzip.zip import visionzip

V5 = int(transformers.__version__.split(".")[0]) >= 5


def _tower(kind: str, layers: int = 4, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    if kind == "clip":
        config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                               num_attention_heads=4, image_size=56, patch_size=7)
        return transformers.CLIPVisionModel._from_config(copy.deepcopy(config), attn_implementation=attn).eval()
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                             num_attention_heads=4, image_size=56, patch_size=7, vision_use_head=False)
    return transformers.SiglipVisionModel._from_config(copy.deepcopy(config), attn_implementation=attn).eval()


def _eager_reference(tower_sdpa, pixels, layer_index, cls_token):
    """Full eager attention of every layer, the way the reference VisionZip gets its scores."""
    eager = copy.deepcopy(tower_sdpa)
    eager.set_attn_implementation("eager") if hasattr(eager, "set_attn_implementation") else None
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[layer_index]  # (B, H, S, S)
    hidden = out.hidden_states[layer_index + 1]
    if cls_token:
        scores = attn[:, :, 0, 1:].sum(1)
    else:
        scores = attn.mean(1).mean(1)
    return hidden, scores


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 2])
def test_hook_scores_equal_full_eager_attention(kind, feature_layer):
    tower = _tower(kind)
    encoder = VisionEncoder(tower, Preprocess(shortest_edge=56, crop_hw=(56, 56)), vision_feature_layer=feature_layer,
                            select_strategy="default" if kind == "clip" else "full")
    assert encoder.cls_token == (kind == "clip")
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    modules = list(tower.modules())
    hooks_before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules]
    ours = encoder.encode_pixels(pixels, chunk=16)
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules] == hooks_before  # none left behind
    hidden, scores = _eager_reference(tower, pixels, encoder.layer_index, encoder.cls_token)
    torch.testing.assert_close(ours.scores, scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.hidden, hidden, rtol=1e-5, atol=1e-5)
    for k in (5, 12):
        assert torch.equal(ours.scores.topk(k).indices.sort().values, scores.topk(k).indices.sort().values)
    # keys: the select layer's k_proj of its layer-normed input, split into heads, averaged over heads
    inner = getattr(tower, "vision_model", tower)
    layer = inner.encoder.layers[encoder.layer_index]
    with torch.no_grad():
        prev = _eager_hidden_before(tower, pixels, encoder.layer_index)
        k = layer.self_attn.k_proj(layer.layer_norm1(prev)).view(3, prev.shape[1], 4, -1).mean(2)
    torch.testing.assert_close(ours.keys, k, rtol=1e-5, atol=1e-5)
    assert tower.config._attn_implementation == "sdpa"  # the tower was never switched to eager


def _eager_hidden_before(tower, pixels, layer_index):
    out = tower(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[layer_index]


def test_tower_stops_after_the_select_layer():
    tower = _tower("clip", layers=6)
    encoder = VisionEncoder(tower, Preprocess(shortest_edge=56, crop_hw=(56, 56)), vision_feature_layer=-2)
    inner = getattr(tower, "vision_model", tower)
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, layer in enumerate(inner.encoder.layers)]
    encoder.encode_pixels(torch.randn(2, 3, 56, 56))
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2, 3, 4]  # layer 5 (the last) never runs


def test_hooks_are_removed_even_when_the_forward_fails():
    tower = _tower("clip")
    encoder = VisionEncoder(tower, Preprocess(shortest_edge=56, crop_hw=(56, 56)))
    modules = list(tower.modules())
    hooks_before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules]
    with pytest.raises((RuntimeError, ValueError)):
        encoder.encode_pixels(torch.randn(2, 3, 57, 13))  # wrong size: the embeddings fail
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules] == hooks_before


@pytest.mark.parametrize("family", FAMILIES)
def test_video_encoder_hidden_equals_the_models_own_features(family, tiny_model_dir):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 40, 70, 3), dtype=np.uint8))
    pixels = encoder.preprocess(frames)
    encoded = encoder.encode(frames)
    crops = encoded.crops
    tower = getattr(vlm.inner, vlm.family.video_tower)
    flat = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels
    with torch.no_grad():
        states = tower(pixel_values=flat, output_hidden_states=True).hidden_states
    layer = vlm.config.get("vision_feature_layer", -2)
    torch.testing.assert_close(encoded.hidden, states[layer], rtol=1e-5, atol=1e-5)
    assert crops == (3 if family == "llava_next" else 1)  # 40x70 -> the 48x96 grid: base + 1x2 tiles
    # compression off gives exactly the tokens the model projects itself
    full = encoder.zip(encoded, 1, 0, method="full").tokens
    expected = states[layer]
    if family in ("llava", "llava_next", "llava_next_video"):
        expected = expected[:, 1:]  # "default" strategy drops CLS
    if family == "llava_next_video":
        expected = vlm.inner.vision_resampler(expected)  # 8x8 -> 4x4 pooling
    torch.testing.assert_close(full, expected)
    if V5 and family in ("llava", "llava_next_video"):
        with torch.no_grad():
            if family == "llava":
                own = torch.stack(list(vlm.inner.get_image_features(pixel_values=pixels).pooler_output))
                torch.testing.assert_close(vlm.inner.multi_modal_projector(full), own)
            else:
                own = vlm.inner.get_video_features(pixel_values_videos=pixels[None]).pooler_output
                torch.testing.assert_close(vlm.inner.multi_modal_projector(full).reshape(1, -1, own.shape[-1]),
                                           own.reshape(1, -1, own.shape[-1]))


def _processor(kind: str, config: dict):
    if kind == "clip":
        name = "CLIPImageProcessorPil" if hasattr(transformers, "CLIPImageProcessorPil") else "CLIPImageProcessor"
    elif kind == "next":
        name = ("LlavaNextImageProcessorPil" if hasattr(transformers, "LlavaNextImageProcessorPil")
                else "LlavaNextImageProcessor")
    else:
        name = ("LlavaOnevisionImageProcessorPil" if hasattr(transformers, "LlavaOnevisionImageProcessorPil")
                else "LlavaOnevisionImageProcessor")
    params = {k: v for k, v in config.items() if not k.endswith("_type")}
    return getattr(transformers, name)(**params)


def _natural_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 / width), (y * 255 / height), ((x + y) % 64) * 4], -1)
    img = img + rng.normal(0, 12, img.shape)
    img[height // 3: height // 2, width // 4: width // 2] = [250, 20, 20]  # a hard edge
    return np.clip(img, 0, 255).astype(np.uint8)


CLIP336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
           "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711]}
NEXT = {**CLIP336, "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}
OV = {"size": {"height": 384, "width": 384}, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
      "image_grid_pinpoints": [[384 * a, 384 * b] for a in range(1, 4) for b in range(1, 4)]}


@pytest.mark.parametrize("kind, config", [("clip", CLIP336), ("next", NEXT), ("ov", OV)])
@pytest.mark.parametrize("height, width", [(240, 426), (1080, 1920), (640, 360)])
def test_preprocessing_matches_the_processor(kind, config, height, width):
    image = _natural_image(height, width)
    theirs = _processor(kind, config)(images=[image], return_tensors="pt")["pixel_values"][0]
    ours = preprocess_frames(torch.from_numpy(image)[None], Preprocess.from_config(config))[0]
    assert ours.shape == theirs.shape
    if not V5 and kind != "clip":
        # transformers 4.x pads anyres grids by (d // 2, d // 2), one pixel short when d is odd, which
        # shifts the last tiles (fixed in 5.x, which pads (d // 2, d - d // 2) as we do): compare the
        # whole-image tile and the first grid tile only.
        ours, theirs = ours[:2], theirs[:2]
    steps = (ours - theirs).abs() / (1 / 255 / min(config["image_std"]))  # in uint8 steps
    # We compute like transformers' torchvision backend; its PIL backend (the one here) rounds between
    # its two resize passes and, on some shapes (a portrait squashed to a square), runs them in the
    # other order, which moves a few pixels on hard edges by more.
    assert steps.mean() <= 0.1, float(steps.mean())
    assert (steps > 2.01).float().mean() <= 0.005
    assert steps.max() <= 16


def test_preprocess_config_errors_and_float_images():
    with pytest.raises(VisionZipError, match="no usable 'size'"):
        Preprocess.from_config({"size": {}})
    spec = Preprocess.from_config(CLIP336)
    image = torch.from_numpy(_natural_image(240, 426))[None]
    as_float = preprocess_frames(image.float() / 255, spec)  # a ComfyUI IMAGE
    torch.testing.assert_close(as_float, preprocess_frames(image, spec))
    with pytest.raises(VisionZipError, match=r"frames must be \[T, H, W, 3\]"):
        preprocess_frames(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), spec)


def test_zip_of_encoded_frames_matches_visionzip_on_the_hook_outputs(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir("video_llava"), device="cpu")
    encoder = vlm.video_encoder()
    frames = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8))
    encoded = encoder.encode(frames)
    result = encoder.zip(encoded, 10, 4)
    direct = visionzip(encoded.hidden, encoded.scores, encoded.keys, 10, 4)
    assert torch.equal(result.tokens, direct.tokens) and result.tokens.shape == (3, 14, 32)


def test_streaming_keeps_only_compressed_tokens(tiny_model_dir, clip_factory):
    from comfy_visionzip import iter_video, sample_video

    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    encoder = vlm.video_encoder()
    path = clip_factory("enc.mkv", frames=60, options={"g": "15"})
    seen = []
    video = compress_frames(encoder, iter_video(path, every=3, chunk_size=8), dominant=12, contextual=4,
                            batch_size=4, progress=lambda done, total: seen.append(done), total=20)
    assert video.tokens.shape == (20, 16, 32) and video.num_frames == 20 and video.total_tokens == 320
    assert video.indices == list(range(0, 60, 3)) and len(video.timestamps) == 20
    assert seen == [4, 8, 12, 16, 20]
    assert video.scores.shape == (20, 64) and video.assignment.shape == (20, 65)
    # the same as encoding every frame at once
    whole = sample_video(path, every=3)
    encoded = encoder.encode(whole.frames)
    torch.testing.assert_close(video.tokens, encoder.zip(encoded, 12, 4).tokens)


def test_bad_select_layer_and_tower():
    with pytest.raises(VisionZipError, match="outside a tower of 4 layers"):
        VisionEncoder(_tower("clip"), Preprocess(shortest_edge=56), vision_feature_layer=-9)
    with pytest.raises(VisionZipError, match=r"Linear is not a supported vision tower \(it holds: no submodules\); "
                                             r"supported: CLIPVisionModel"):
        VisionEncoder(torch.nn.Linear(2, 2), Preprocess(shortest_edge=56))
