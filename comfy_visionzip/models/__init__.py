"""One module per model family behind one small interface (:class:`FamilyModule`), and the registry.

Adding a family is adding a file here and one line below; nothing else branches on ``model_type``.
"""

from .bare import BareTower, VisionTower
from .base import ChatView, Encoder, FamilyModule, PromptVideo, VisionLanguageModel, VisualLayout
from .llava import Llava
from .llava_next import LlavaNext
from .llava_next_video import LlavaNextVideo
from .onevision import Onevision
from .qwen2_5_vl import Qwen2_5_VL
from .qwen3_vl import Qwen3_VL
from .video_llava import VideoLlava

FAMILIES: dict[str, FamilyModule] = {
    family.model_type: family
    for family in (Llava(), LlavaNext(), LlavaNextVideo(), VideoLlava(), Onevision(), Qwen2_5_VL(), Qwen3_VL())
}

__all__ = ["FAMILIES", "BareTower", "ChatView", "Encoder", "FamilyModule", "PromptVideo", "VisionLanguageModel",
           "VisionTower", "VisualLayout"]
