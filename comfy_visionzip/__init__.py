"""ComfyUI-VisionZip library: ask vision-language models about long videos with VisionZip token compression.

Pure Python + torch + transformers; never imports ComfyUI. The data flow runs one way:
plan (budget) -> sample (video) -> encode (vision tower to the select layer + one attention row) -> zip
(dominant + contextual tokens) -> [temporal] -> answer (projector, prompt, generation, chat with a kept
KV cache). Each step is a module of its own; the README's "Code layout" lists them.
"""

from .adapter import Adapter, apply_adapter, read_adapter
from .answer import Chat, GenerationConfig
from .budget import BudgetPlan, context_length, frames_for_budget, plan_budget
from .encoded import EncodedImages, Encoder
from .encoder import VisionEncoder
from .errors import VideoError, VideoNotFoundError, VisionZipError
from .index import ask_index, index_library
from .library import IndexSettings, ModelSpec
from .models import VisionLanguageModel
from .pipeline import compress_frames, compress_video, encode_frames
from .preprocess import Preprocess
from .settings import Compression
from .store import load_tokens, save_tokens
from .temporal import Temporal
from .tokens import CompressedVideo
from .tune import TuneSettings, tune_projector
from .video import FramesHandle, VideoClip, VideoHandle, iter_video, plan_frames, sample_video
from .vlm import load_vlm
from .zip import ZipResult, compress, split_tokens, visionzip

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "BudgetPlan",
    "Chat",
    "CompressedVideo",
    "Compression",
    "EncodedImages",
    "Encoder",
    "FramesHandle",
    "GenerationConfig",
    "IndexSettings",
    "ModelSpec",
    "Preprocess",
    "Temporal",
    "TuneSettings",
    "VideoClip",
    "VideoError",
    "VideoHandle",
    "VideoNotFoundError",
    "VisionEncoder",
    "VisionLanguageModel",
    "VisionZipError",
    "ZipResult",
    "apply_adapter",
    "ask_index",
    "compress",
    "compress_frames",
    "compress_video",
    "context_length",
    "encode_frames",
    "frames_for_budget",
    "index_library",
    "iter_video",
    "load_tokens",
    "load_vlm",
    "plan_budget",
    "plan_frames",
    "read_adapter",
    "sample_video",
    "save_tokens",
    "split_tokens",
    "tune_projector",
    "visionzip",
]
