"""Visual tokens -> the language model's input space, in prompt order, and how many there will be.

:func:`project` runs the checkpoint's own projector and then arranges the tokens the way the family
does (pooling, anyres packing, newline tokens); :func:`visual_layout` answers "how many placeholder
tokens do n frames become" with the very same arranging code, run on zeros, so the budget planner's
count and the prefilled count cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder import CompressedVideo, EncodedImages, select_best_resolution
from .errors import VisionZipError
from .vlm import token_identity

IDENTITY_NAMES = {"family": "family", "vision_hidden": "vision width", "grid": "patch grid", "select_layer": "select layer",
                  "tower_layers": "tower layers", "select_strategy": "feature strategy", "tower": "vision tower config"}


def check_compatible(vlm, video: CompressedVideo) -> None:
    """Tokens made with another model (or tower, or settings) cannot be projected by this one: a clear
    error naming what differs. Fields a tokens file does not record (older files) are not compared."""
    ours = token_identity(vlm)
    made = {**video.meta, "vision_hidden": int(video.tokens.shape[-1])}  # the tokens' own width is the truth
    differences = []
    for key, label in IDENTITY_NAMES.items():
        theirs = made.get(key)
        if theirs in (None, ""):
            continue
        if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != ours[key]:
            differences.append(f"{label} {_shown(theirs)} vs {_shown(ours[key])}")
    spec = vlm.video_encoder().preprocess_spec
    if video.preprocess is not None and video.preprocess != spec:
        differences.append(f"preprocessing {_shown_spec(video.preprocess)} vs {_shown_spec(spec)}")
    if differences:
        raise VisionZipError(
            f"these tokens were made with {made.get('model', 'another model')} ({made.get('family') or 'unknown family'}, "
            f"vision width {made['vision_hidden']}); {vlm.name} is {ours['family']} with vision width {ours['vision_hidden']}; "
            f"they differ in: {'; '.join(differences)}: encode the video again with this model"
        )


def _shown(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return str(value)


def _shown_spec(spec) -> str:
    if spec.pixels:
        return f"{spec.pixels[1]}..{spec.pixels[2]} pixels in multiples of {spec.pixels[0]}"
    size = spec.crop_hw or spec.resize_hw or (spec.shortest_edge, spec.shortest_edge)
    return f"{size[0]}x{size[1]}{' anyres' if spec.pinpoints else ''}"


def arrange(vlm, projected: torch.Tensor, *, method: str, crops: int, frame_size) -> torch.Tensor:
    """(frames, crops * K, D_text) projected tokens -> (N, D_text) in prompt order, the family's way
    (see :mod:`comfy_visionzip.models`: pooling, anyres packing, newline tokens)."""
    return vlm.family.arrange(vlm, projected, method=method, crops=crops, frame_size=frame_size)


def project(vlm, video: CompressedVideo) -> torch.Tensor:
    """(N, D_text): every visual token of the video, projected by the model's own projector, in prompt order."""
    check_compatible(vlm, video)
    with torch.inference_mode():
        return vlm.family.project(vlm, video)


@dataclass(frozen=True)
class VisualLayout:
    """How many placeholder tokens a video of n frames becomes with one model and one setting."""

    per_frame: int  # placeholders per frame (crops x tokens per image, plus any per-frame newline)
    extra: int  # placeholders once per video (LLaVA-OneVision's closing newline)
    crops: int  # images the tower sees per frame (anyres: the whole frame + tiles)
    per_image: int  # tokens each image keeps
    frames_per_unit: int = 1  # sampled frames per encoded frame (Qwen: two per temporal patch)

    def units(self, frames: int) -> int:
        """Encoded frames (temporal patches) that ``frames`` sampled frames make (an odd last one is repeated)."""
        return -(-frames // self.frames_per_unit)

    def total(self, frames: int) -> int:
        return self.units(frames) * self.per_frame + self.extra

    def besides_tokens(self, frames: int) -> int:
        """Placeholders that are not visual tokens (newline tokens) in a video of ``frames`` frames."""
        return self.total(frames) - self.units(frames) * self.crops * self.per_image

    def frames_for(self, visual_tokens: int) -> int:
        return max((visual_tokens - self.extra) // self.per_frame, 0) * self.frames_per_unit


def frame_placeholders(vlm, video: CompressedVideo) -> tuple[int, ...]:
    """Placeholders of each frame when the temporal stage made them differ (its kept tokens + the family's
    per-frame extras, e.g. LLaVA-NeXT's newline); () when every frame has the same count."""
    if video.repeats is None:
        return ()
    layout = visual_layout(vlm, method=video.method, dominant=video.dominant, contextual=video.contextual,
                           frame_size=video.meta.get("frame_size"))
    extra = layout.per_frame - layout.crops * layout.per_image
    return tuple(int(k) + extra for k in video.frame_tokens())


def crops_per_frame(spec, frame_size) -> int:
    """Images per frame: 1, or with anyres 1 + the tiles of the grid chosen for a frame of (H, W)."""
    if not spec.pinpoints:
        return 1
    if not frame_size:
        raise VisionZipError("an anyres model needs the frame size to count its tiles")
    height, width = frame_size
    rows, cols = (side // spec.tile for side in select_best_resolution(int(height), int(width), spec.pinpoints))
    return 1 + rows * cols


def visual_layout(vlm, *, method: str = "visionzip", dominant: int = 54, contextual: int = 10,
                  frame_size: tuple[int, int] | None = None) -> VisualLayout:
    """The exact placeholder count of frames of (H, W) ``frame_size`` compressed with ``method``.

    Runs the encoder's own compressor and the family's own arranging on zeros (no pixels, no tower
    forward), so it also validates ``dominant`` / ``contextual`` against the tower before any decoding.
    """
    own = vlm.family.layout(vlm, method=method, dominant=dominant, contextual=contextual, frame_size=frame_size)
    if own is not None:
        return own
    encoder = vlm.video_encoder()
    crops = crops_per_frame(encoder.preprocess_spec, frame_size)
    seq = encoder.tokens_per_image
    width = int(encoder.tower.config.hidden_size)
    dtype, device = encoder.dtype, encoder.device
    patches = seq - 1 if encoder.cls_token else seq
    dummy = EncodedImages(torch.zeros(1, seq, width, dtype=dtype, device=device),
                          torch.zeros(1, patches, device=device), torch.zeros(1, seq, 8, device=device),
                          encoder.cls_token, encoder.grid)
    with torch.inference_mode():
        per_image = int(encoder.zip(dummy, dominant, contextual, method).tokens.shape[1])
        text_width = int(vlm.inner.multi_modal_projector(torch.zeros(1, 1, width, dtype=vlm.dtype, device=vlm.device)).shape[-1])

        def count(frames: int) -> int:
            zeros = torch.zeros(frames, crops * per_image, text_width, dtype=vlm.dtype, device=vlm.device)
            return int(arrange(vlm, zeros, method=method, crops=crops, frame_size=frame_size).shape[0])

        one, two = count(1), count(2)
    return VisualLayout(per_frame=two - one, extra=2 * one - two, crops=crops, per_image=per_image)
