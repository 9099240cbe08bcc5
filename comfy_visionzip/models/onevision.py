"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``; LLaVA-Video checkpoints use it too):
a SigLIP tower; uncompressed frames are pooled 2x bilinearly after projecting, and the video ends with
one ``image_newline``."""

from collections.abc import Sequence

import torch

from .base import FamilyModule, VisionLanguageModel


class Onevision(FamilyModule):
    model_type = "llava_onevision"
    class_name = "LlavaOnevisionForConditionalGeneration"
    display = "LLaVA-OneVision"
    video_input = "video"

    def arrange(self, vlm: VisionLanguageModel, projected: torch.Tensor, *, method: str, crops: int,
                frame_size: Sequence[int] | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        inner = vlm.inner
        if method == "full":
            projected = inner.apply_pooling(projected)
        flat = projected[keep.to(projected.device)] if keep is not None else projected.reshape(-1, projected.shape[-1])
        return torch.cat([flat, inner.image_newline[None].to(flat)], dim=0)
