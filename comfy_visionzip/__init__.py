"""ComfyUI-VisionZip library: ask LLaVA-family models about long videos with VisionZip token compression.

Pure Python + torch; never imports ComfyUI. See DESIGN in the README for the data flow:
sample (video) -> encode (vision tower + one attention row) -> zip (dominant + contextual) -> answer.
"""

from .budget import frames_for_budget
from .errors import VideoError, VideoNotFoundError, VisionZipError
from .video import VideoClip, VideoHandle, iter_video, plan_frames, sample_video

__version__ = "0.1.0"

__all__ = [
    "VideoClip",
    "VideoError",
    "VideoHandle",
    "VideoNotFoundError",
    "VisionZipError",
    "frames_for_budget",
    "iter_video",
    "plan_frames",
    "sample_video",
]
