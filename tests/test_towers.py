"""Tower adapters: CLIP, SigLIP and DINOv2 (with and without registers) read through one seam; the
encoder's scores, keys and hidden states equal the eager attention of the same layer, registers excluded."""

from __future__ import annotations

import pytest
import torch
import transformers

from comfy_visionzip import VisionZipError
from comfy_visionzip.encoder import VisionEncoder
from comfy_visionzip.preprocess import Preprocess
from comfy_visionzip.towers import ADAPTERS, tower_parts
from comfy_visionzip.zip import visionzip

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _dinov2(registers: int):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=112,
                  patch_size=14, attn_implementation="eager")
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**common)).eval()


def _key_heads(layer, parts, states):
    """The layer's key projection of its own input (layer norm first), averaged over heads."""
    with torch.no_grad():
        k = parts.keys[list(parts.layers).index(layer)](layer.norm1(states))
    B, S, _ = k.shape
    return k.view(B, S, parts.num_heads, -1).mean(2)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_scores_keys_and_hidden_equal_eager_attention(registers):
    tower = _dinov2(registers)
    parts = tower_parts(tower)
    assert parts.architecture == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert parts.registers == registers and parts.cls_token and len(parts.layers) == 3
    # run at 56 px (below the 112 px position table, as DINOv2 interpolates): a 4x4 grid
    encoder = VisionEncoder(tower, Preprocess(shortest_edge=56, crop_hw=(56, 56), **IMAGENET), vision_feature_layer=-2)
    assert encoder.grid == (4, 4) and encoder.tokens_per_image == 17
    pixels = torch.randn(2, 3, 56, 56)
    ours = encoder.encode_pixels(pixels)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    layer = encoder.layer_index
    attention = out.attentions[layer]  # (B, H, S, S), S = 1 + registers + 16
    prefix = 1 + registers
    assert attention.shape[-1] == prefix + 16
    keep = [0, *range(prefix, prefix + 16)]  # CLS and the patches: registers are never tokens
    torch.testing.assert_close(ours.scores, attention[:, :, 0, prefix:].sum(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.hidden, out.hidden_states[layer + 1][:, keep], rtol=1e-4, atol=1e-5)
    keys = _key_heads(encoder.layer, parts, out.hidden_states[layer])[:, keep]
    torch.testing.assert_close(ours.keys, keys, rtol=1e-4, atol=1e-5)
    # the kept positions: the reference selection on eager numbers is ours
    mine = visionzip(ours.hidden, ours.scores, ours.keys, 5, 2)
    theirs = visionzip(out.hidden_states[layer + 1][:, keep], attention[:, :, 0, prefix:].sum(1), keys, 5, 2)
    assert torch.equal(mine.dominant_positions, theirs.dominant_positions)
    assert int(mine.dominant_positions.max()) <= 16  # positions index CLS + patches only


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_patch_attention_skips_the_registers(registers):
    tower = _dinov2(registers)
    encoder = VisionEncoder(tower, Preprocess(shortest_edge=56, crop_hw=(56, 56), **IMAGENET))
    frames = torch.randint(0, 255, (1, 56, 56, 3), dtype=torch.uint8)
    row, patch = encoder.attention_from(frames, (0.9, 0.1))
    with torch.no_grad():
        attention = tower(pixel_values=encoder.preprocess(frames),
                          output_attentions=True).attentions[encoder.layer_index]
    prefix = 1 + registers
    torch.testing.assert_close(row, attention[:, :, prefix + patch, prefix:].mean(1), rtol=1e-4, atol=1e-6)


def test_clip_and_siglip_adapters_and_an_unknown_tower():
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14))
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14))
    assert tower_parts(clip).cls_token and not tower_parts(siglip).cls_token
    inner = getattr(clip, "vision_model", clip)  # transformers 4.x wraps it; 5.x does not
    assert tower_parts(clip).queries[1] is inner.encoder.layers[1].self_attn.q_proj
    assert set(ADAPTERS) >= {"CLIPVisionModel", "SiglipVisionModel", "Dinov2Model", "Dinov2WithRegistersModel"}
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                       intermediate_size=64, image_size=28, patch_size=14))
    with pytest.raises(VisionZipError, match=r"ViTModel is not a supported vision tower \(it holds: embeddings, .*\); "
                                             r"supported: CLIPVisionModel"):
        tower_parts(vit)
