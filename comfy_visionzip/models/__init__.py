"""One module per model family behind one small interface (:class:`FamilyModule`), and the registry.

Adding a family is adding a file here and one line below; nothing else branches on ``model_type``.
"""

from .base import BareTower, FamilyModule
from .llava import Llava
from .llava_next import LlavaNext
from .llava_next_video import LlavaNextVideo
from .onevision import Onevision
from .video_llava import VideoLlava

FAMILIES: dict[str, FamilyModule] = {
    family.model_type: family
    for family in (Llava(), LlavaNext(), LlavaNextVideo(), VideoLlava(), Onevision())
}

__all__ = ["FAMILIES", "BareTower", "FamilyModule"]
