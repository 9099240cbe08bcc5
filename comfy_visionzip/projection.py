"""Visual tokens -> the language model's input space, in prompt order, and how many there will be.

:func:`project` runs the checkpoint's own projector and then arranges the tokens the way the family
does (pooling, anyres packing, newline tokens); :func:`visual_layout` answers "how many placeholder
tokens do n frames become" with the family's own arranging code (run on zeros), so the budget
planner's count and the prefilled count cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models.base import VisionLanguageModel, VisualLayout
from .tokens import CompressedVideo


def project(vlm: VisionLanguageModel, video: CompressedVideo) -> torch.Tensor:
    """(N, D_text): every visual token of the video, projected by the model's own projector, in prompt order."""
    vlm.check_tokens(video)
    with torch.inference_mode():
        return vlm.family.project(vlm, video)


def visual_layout(vlm: VisionLanguageModel, *, method: str = "visionzip", dominant: int = 54, contextual: int = 10,
                  frame_size: Sequence[int] | None = None) -> VisualLayout:
    """The exact placeholder count of frames of (H, W) ``frame_size`` compressed with ``method`` (see
    :meth:`~comfy_visionzip.models.base.FamilyModule.layout`); validates the counts against the tower."""
    return vlm.family.layout(vlm, method=method, dominant=dominant, contextual=contextual, frame_size=frame_size)


def video_layout(vlm: VisionLanguageModel, video: CompressedVideo) -> VisualLayout:
    """The layout of a compressed video's own settings, counted in its encoded frames."""
    return visual_layout(vlm, method=video.method, dominant=video.dominant, contextual=video.contextual,
                         frame_size=video.meta.get("frame_size")).encoded()


def frame_placeholders(vlm: VisionLanguageModel, video: CompressedVideo) -> tuple[int, ...]:
    """Placeholders of each frame when the temporal stage made them differ (its kept tokens + the family's
    per-frame extras, e.g. LLaVA-NeXT's newline); () when every frame has the same count."""
    if video.repeats is None:
        return ()
    layout = video_layout(vlm, video)
    extra = layout.per_frame - layout.crops * layout.per_image
    return tuple(int(k) + extra for k in video.frame_tokens())
