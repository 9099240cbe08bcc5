"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): its own video tower, which keeps CLS for
video frames (the "full" feature strategy)."""

from .base import FamilyModule, VisionLanguageModel


class VideoLlava(FamilyModule):
    model_type = "video_llava"
    class_name = "VideoLlavaForConditionalGeneration"
    display = "Video-LLaVA"
    video_tower = "video_tower"
    video_input = "video"

    def select_strategy(self, vlm: VisionLanguageModel) -> str:
        return "full"  # Video-LLaVA keeps CLS for video frames
