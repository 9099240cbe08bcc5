"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): frames through the video path; the
model's 2x2 resampler is what "full" (no compression) means, so it is used for that method."""

import torch

from .base import FamilyModule, VisionLanguageModel


class LlavaNextVideo(FamilyModule):
    model_type = "llava_next_video"
    class_name = "LlavaNextVideoForConditionalGeneration"
    display = "LLaVA-NeXT-Video"
    video_input = "video"

    def resampler(self, vlm: VisionLanguageModel) -> torch.nn.Module | None:
        return getattr(vlm.inner, "vision_resampler", None)
