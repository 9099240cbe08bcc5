"""Family modules: one file per family behind one interface, one registry; both encoders behind the Encoder
interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from comfy_visionzip.encoded import EncodedImages, Encoder
from comfy_visionzip.encoder import VisionEncoder
from comfy_visionzip.models import FAMILIES, FamilyModule
from comfy_visionzip.models.qwen_vision import QwenEncoder
from comfy_visionzip.preprocess import Preprocess
from comfy_visionzip.testing.tiny import ALL_FAMILIES as TINY
from comfy_visionzip.tokens import IDENTITY_NAMES
from comfy_visionzip.video import sample_video
from comfy_visionzip.vlm import load_vlm


def test_every_family_is_a_module_in_the_registry():
    assert set(FAMILIES) == set(TINY)
    for model_type, family in FAMILIES.items():
        assert isinstance(family, FamilyModule) and family.model_type == model_type and family.display
        assert hasattr(transformers, family.class_name) or family.model_type == "qwen3_vl", family.class_name  # 4.57+
        assert family.video_input in ("image", "video")
        module = Path(__import__(type(family).__module__, fromlist=["_"]).__file__)
        assert module.parent.name == "models"  # its own file


def _members(protocol: type) -> set[str]:
    """The attributes and methods a Protocol declares (its own, not object's)."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {k for k, v in vars(protocol).items()
              if not k.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_5_vl"])
def test_both_encoders_implement_the_encoder_interface(family, tiny_model_dir, clip_factory):
    """The CLIP/SigLIP encoder and the Qwen encoder are Encoders: every member shared code uses is declared on
    the interface and works the same way on both (types, shapes, one encoded image per unit of frames)."""
    members = _members(Encoder)
    assert {"tower", "preprocess_spec", "cls_token", "grid", "layer_index", "num_layers", "select_strategy",
            "frames_per_unit", "width", "device", "dtype", "tokens_per_image", "decode_cover", "encode", "zip", "view",
            "patch_grid", "attention_from", "units", "frame_bytes", "identity"} <= members
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    assert isinstance(encoder, Encoder) and isinstance(encoder, (VisionEncoder, QwenEncoder))
    for name in members:
        assert hasattr(encoder, name), f"{type(encoder).__name__} lacks {name}"
    assert isinstance(encoder.tower, torch.nn.Module) and isinstance(encoder.preprocess_spec, Preprocess)
    assert isinstance(encoder.cls_token, bool) and encoder.select_strategy in ("default", "full")
    assert 0 <= encoder.layer_index < encoder.num_layers and encoder.frames_per_unit in (1, 2)
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    assert isinstance(encoder.width, int) and encoder.width > 0 and encoder.tokens_per_image > 0
    assert encoder.frame_bytes() > 0
    cover = encoder.decode_cover()
    assert len(cover) == 2 and all(isinstance(v, int) and v > 0 for v in cover)
    identity = encoder.identity()
    assert set(identity) == set(IDENTITY_NAMES) - {"family", "vision_hidden"}
    assert identity["select_layer"] == encoder.layer_index and identity["tower_layers"] == encoder.num_layers
    frames = sample_video(clip_factory("iface.mp4", frames=20), num_frames=4).frames
    unit = encoder.frames_per_unit
    times, indices = encoder.units([0.0, 0.5, 1.0, 1.5], [0, 5, 10, 15])
    assert len(times) == len(indices) == 4 // unit and indices[0] == 0
    encoded = encoder.encode(frames)
    assert isinstance(encoded, EncodedImages) and encoded.num_frames == 4 // unit
    assert encoded.hidden.shape[-1] >= encoder.width  # Qwen3-VL's DeepStack rows ride after the main features
    kept = encoder.zip(encoded, 3, 1)
    assert kept.tokens.shape[:2] == (len(encoded), 4)
    assert encoder.view(frames).dtype == torch.uint8 and encoder.view(frames).shape[0] == 4 // unit
    rows, cols = encoder.patch_grid(frames)
    attention, patch = encoder.attention_from(frames, (0.5, 0.5))
    assert attention.shape == (4 // unit, rows * cols) and 0 <= patch < rows * cols
    assert vlm.token_identity() == {"family": family, "vision_hidden": vlm.family.token_width(vlm), **identity,
                                    "adapter": None}  # no projector adapter applied
