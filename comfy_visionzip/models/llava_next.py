"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops (the whole frame + grid tiles).

Uncompressed ("full") tokens are packed the model's own way (the tile grid unpadded, an
``image_newline`` after every row); compressed tokens have no rows, so one newline closes each frame.
"""

from collections.abc import Sequence

import torch

from .base import FamilyModule, VisionLanguageModel


class LlavaNext(FamilyModule):
    model_type = "llava_next"
    class_name = "LlavaNextForConditionalGeneration"
    display = "LLaVA-NeXT"

    def arrange(self, vlm: VisionLanguageModel, projected: torch.Tensor, *, method: str, crops: int,
                frame_size: Sequence[int] | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        inner = vlm.inner
        if keep is not None:  # temporal: each frame's kept tokens, then its newline
            newline = inner.image_newline[None].to(projected)
            return torch.cat([part for f in range(projected.shape[0])
                              for part in (projected[f][keep[f].to(projected.device)], newline)], dim=0)
        if method == "full" and crops > 1 and frame_size:
            strategy = vlm.config.get("vision_feature_select_strategy", "default")
            per_crop = projected.view(projected.shape[0], crops, -1, projected.shape[-1])
            packed = []
            for frame in per_crop:
                out = inner.pack_image_features([frame], torch.tensor([list(frame_size)]), strategy,
                                                image_newline=inner.image_newline)[0]
                packed.append(torch.cat(list(out)) if isinstance(out, (list, tuple)) else out)  # 5.x: a list
            return torch.cat(packed, dim=0)
        newline = inner.image_newline[None, None].to(projected).expand(projected.shape[0], 1, -1)
        return torch.cat([projected, newline], dim=1).reshape(-1, projected.shape[-1])
