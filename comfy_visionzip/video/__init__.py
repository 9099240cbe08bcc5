"""Frame sampling for long videos: plans (pure), a PyAV frame index, decoder backends, the public API."""

from .api import FramesHandle, VideoClip, VideoHandle, iter_video, sample_video
from .backends import BACKENDS, resolve_backend
from .plan import SEEKS, check_plan_args, plan_frames, uniform_pick
from .probe import StreamIndex, build_index, get_index

__all__ = [
    "BACKENDS",
    "SEEKS",
    "FramesHandle",
    "StreamIndex",
    "VideoClip",
    "VideoHandle",
    "build_index",
    "check_plan_args",
    "get_index",
    "iter_video",
    "plan_frames",
    "resolve_backend",
    "sample_video",
    "uniform_pick",
]
