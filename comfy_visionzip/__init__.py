"""ComfyUI-VisionZip library: ask LLaVA-family models about long videos with VisionZip token compression.

Pure Python + torch; never imports ComfyUI. The data flow runs one way:
sample (video) -> encode (vision tower to the select layer + one attention row) -> zip (dominant +
contextual tokens) -> answer (projector, prompt, generation, chat with a kept KV cache).
transformers is imported only when a model is loaded.
"""

from .answer import Chat, GenerationConfig
from .budget import BudgetPlan, context_length, frames_for_budget, plan_budget
from .encoder import CompressedVideo, Preprocess, VisionEncoder, compress_frames, encode_frames
from .errors import VideoError, VideoNotFoundError, VisionZipError
from .store import load_tokens, save_tokens
from .temporal import Temporal
from .video import FramesHandle, VideoClip, VideoHandle, iter_video, plan_frames, sample_video
from .vlm import VisionLanguageModel, compress_video, load_vlm
from .zip import ZipResult, compress, split_tokens, visionzip

__version__ = "0.1.0"

__all__ = [
    "BudgetPlan",
    "Chat",
    "CompressedVideo",
    "FramesHandle",
    "GenerationConfig",
    "Preprocess",
    "Temporal",
    "VideoClip",
    "VideoError",
    "VideoHandle",
    "VideoNotFoundError",
    "VisionEncoder",
    "VisionLanguageModel",
    "VisionZipError",
    "ZipResult",
    "compress",
    "compress_frames",
    "compress_video",
    "context_length",
    "encode_frames",
    "frames_for_budget",
    "iter_video",
    "load_tokens",
    "load_vlm",
    "plan_budget",
    "plan_frames",
    "sample_video",
    "save_tokens",
    "split_tokens",
    "visionzip",
]
