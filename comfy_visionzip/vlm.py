"""Loading LLaVA-family checkpoints and exposing their vision encoders.

Supported (Hugging Face transformers classes, detected from ``config.json``'s ``model_type``):
LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``), LLaVA-NeXT-Video (``llava_next_video``),
Video-LLaVA (``video_llava``), LLaVA-OneVision (``llava_onevision``), Qwen2.5-VL (``qwen2_5_vl``),
Qwen3-VL (``qwen3_vl``).

Safe by default: weights load from ``.safetensors`` only (pickled ``.bin`` files need
``allow_pickle=True``), and ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .encoder import Preprocess, VisionEncoder, auto_batch_size, compress_frames
from .errors import VisionZipError
from .models import FAMILIES, BareTower, FamilyModule
from .video import VideoHandle

log = logging.getLogger(__name__)


def _read_json(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise VisionZipError(f"{path}: cannot read it as JSON ({e})") from e


def detect_family(folder: str) -> tuple[FamilyModule, dict]:
    """The family of the checkpoint in ``folder``, from its config.json; clear errors otherwise."""
    if not os.path.isdir(folder):
        raise VisionZipError(f"{folder}: not a folder")
    config = _read_json(folder, "config.json")
    if config is None:
        found = sorted(os.listdir(folder))[:8]
        raise VisionZipError(f"{folder}: no config.json, so not a Hugging Face model folder (it holds: {found or 'nothing'})")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        supported = ", ".join(f"{f.display} ({t})" for t, f in FAMILIES.items())
        raise VisionZipError(f"{folder}: model_type {model_type!r} ({arch}) is not supported; supported: {supported}")
    return FAMILIES[model_type], config


def resolve_model_path(path_or_id: str) -> str:
    """A local folder as is; otherwise a Hugging Face id, downloaded (safetensors + configs) if the network allows."""
    path = os.path.expanduser(str(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise VisionZipError(f"{path}: is a file; give the model's folder (the one with config.json)")
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise VisionZipError(f"{path}: no such model folder (and not a Hugging Face id like 'llava-hf/llava-1.5-7b-hf')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all mean "not available here"
        raise VisionZipError(f"{path}: not a local folder, and downloading it from Hugging Face failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); download it into a folder and give its path") from e


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VisionZipError("device 'cuda' was asked for, but this torch has no CUDA device; use 'cpu' or 'auto'")
    return device


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in _DTYPES:
        raise VisionZipError(f"unknown dtype {dtype!r}; valid: auto, fp32, fp16, bf16")
    return _DTYPES[dtype]


def _quantization_config(quantization: str | None, device: torch.device):
    if quantization in (None, "none"):
        return None
    if quantization not in ("8bit", "4bit"):
        raise VisionZipError(f"unknown quantization {quantization!r}; valid: none, 8bit, 4bit")
    if device.type != "cuda":
        raise VisionZipError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); this device is {device.type}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise VisionZipError(f"{quantization} loading needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_quant_type="nf4")


@dataclass
class VisionLanguageModel:
    """A loaded LLaVA-family checkpoint: the model, its tokenizer and its preprocessing."""

    model: Any  # the transformers *ForConditionalGeneration
    family: FamilyModule  # the family module (comfy_visionzip.models): all per-family knowledge
    path: str
    config: dict
    tokenizer: Any
    image_config: dict  # image processor settings
    video_config: dict | None  # video processor settings (families with a video path)
    device: torch.device
    dtype: torch.dtype
    _encoders: dict = field(default_factory=dict, repr=False)

    @property
    def inner(self):
        """The module holding the towers and the projector (``model.model`` in transformers 5, the model in 4)."""
        inner = getattr(self.model, "model", None)
        return inner if hasattr(inner, "multi_modal_projector") else self.model

    def to(self, device: str | torch.device) -> VisionLanguageModel:
        """Move the model (e.g. to the GPU for a run and back to the CPU after); "auto" picks the best device."""
        device = _pick_device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def video_encoder(self) -> VisionEncoder:
        """The encoder video frames go through (the video tower / video preprocessing where the family has one)."""
        if "video" not in self._encoders:
            self._encoders["video"] = self.family.encoder(self)
        return self._encoders["video"]


def _processor_configs(folder: str) -> tuple[dict, dict | None]:
    nested = _read_json(folder, "processor_config.json") or {}
    image = nested.get("image_processor") or _read_json(folder, "preprocessor_config.json")
    video = nested.get("video_processor") or _read_json(folder, "video_preprocessor_config.json")
    if image is None:
        raise VisionZipError(f"{folder}: no image processor settings (preprocessor_config.json or processor_config.json)")
    return image, video


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:240]


def _check_safetensors(path: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):  # reads and checks the header only
            pass
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike: the file is unusable
        raise VisionZipError(f"{path}: not a readable safetensors file ({_first_line(e)}); it is truncated or "
                             "corrupt: download it again") from e


def _check_files(folder: str, files: list[str]) -> None:
    """Cheap checks of a model folder before anything is loaded: weights readable, shards present, a tokenizer."""
    index = _read_json(folder, "model.safetensors.index.json")
    if index is not None:
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise VisionZipError(f"{folder}: weight shards listed in model.safetensors.index.json are missing: "
                                 f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; download them too")
    for name in sorted(f for f in files if f.endswith(".safetensors")):
        _check_safetensors(os.path.join(folder, name))
    if not any(f in files for f in TOKENIZER_FILES):
        raise VisionZipError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                             "download the checkpoint's tokenizer files into the folder")


def load_vlm(
    path_or_id: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    allow_pickle: bool = False,
) -> VisionLanguageModel:
    """Load a LLaVA-family checkpoint from a folder (or a Hugging Face id where the network allows).

    Args:
        device: "auto"/None (cuda > mps > cpu), "cuda", "cuda:1", "cpu", "mps".
        dtype: "auto"/None (fp16 on GPU, fp32 on CPU), "fp32", "fp16", "bf16".
        attn_implementation: "sdpa" (default), "eager", or "flash_attention_2" where installed.
        quantization: None, "8bit" or "4bit" (bitsandbytes, CUDA only).
        allow_pickle: also accept pickled ``.bin`` weights (only for files you trust).
    """
    import transformers

    folder = resolve_model_path(path_or_id)
    family, config = detect_family(folder)
    cls = getattr(transformers, family.class_name, None)
    if cls is None:
        raise VisionZipError(f"{family.display} needs a newer transformers: this one ({transformers.__version__}) has no "
                             f"{family.class_name}; upgrade transformers (pip install -U transformers)")
    files = os.listdir(folder)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    if not has_safetensors and not allow_pickle:
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise VisionZipError(
            f"{folder}: no .safetensors weights" + (f" (found pickled {pickles[:3]})" if pickles else "")
            + "; convert them to safetensors, or, if you trust the files, allow pickles (allow_pickle=True; "
            "--allow-pickle on the command line)"
        )
    _check_files(folder, files)
    device_ = _pick_device(device)
    dtype_ = _pick_dtype(dtype, device_)
    kwargs: dict[str, Any] = dict(attn_implementation=attn_implementation, use_safetensors=has_safetensors,
                                  trust_remote_code=False)
    quant = _quantization_config(quantization, device_)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device_.index or 0})
    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype_
    image_config, video_config = _processor_configs(folder)
    from transformers import AutoTokenizer  # transformers loads with the first model: importing the pack stays cheap

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the folder's tokenizer files are unusable
        raise VisionZipError(f"{folder}: its tokenizer cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                             "download the checkpoint's tokenizer files again (tokenizer.json / tokenizer_config.json)") from e
    try:
        model = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - a model folder is user input: one clear line whatever broke
        raise VisionZipError(f"{folder}: loading the {family.display} weights failed ({type(e).__name__}: "
                             f"{_first_line(e)}); check that the folder is one complete checkpoint") from e
    if quant is None:
        model.to(device_)
    model.eval()
    log.info("loaded %s (%s) on %s in %s", folder, family.display, device_, dtype_)
    return VisionLanguageModel(model, family, folder, config, tokenizer, image_config, video_config, device_, dtype_)


TOWER_CLASSES = {  # config.json model_type of a bare vision tower -> transformers class
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def load_tower(path: str | os.PathLike, *, device=None, dtype=None, vision_feature_layer: int = -2,
               attn_implementation: str = "sdpa") -> VisionEncoder:
    """A bare vision tower from a transformers folder (config.json + safetensors + preprocessor_config.json)
    as a :class:`~comfy_visionzip.encoder.VisionEncoder` (for benches, heatmaps, the demo)."""
    import transformers  # loaded with the first model: importing the pack stays cheap

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise VisionZipError(f"{folder}: no such tower folder")
    config = _read_json(folder, "config.json")
    if config is None:
        raise VisionZipError(f"{folder}: no config.json, so not a transformers model folder")
    model_type = config.get("model_type")
    if model_type not in TOWER_CLASSES:
        raise VisionZipError(f"{folder}: model_type {model_type!r} is not a supported bare tower; supported: "
                             f"{', '.join(TOWER_CLASSES)}")
    files = sorted(os.listdir(folder))
    if not any(f.endswith(".safetensors") for f in files):
        raise VisionZipError(f"{folder}: no .safetensors weights")
    for name in (f for f in files if f.endswith(".safetensors")):
        _check_safetensors(os.path.join(folder, name))
    processor = _read_json(folder, "preprocessor_config.json")
    if processor is None:
        raise VisionZipError(f"{folder}: no preprocessor_config.json (how images become pixels)")
    device_ = _pick_device(device)
    dtype_ = _pick_dtype(dtype, device_)
    cls = getattr(transformers, TOWER_CLASSES[model_type])
    kwargs = {"attn_implementation": attn_implementation, "use_safetensors": True,
              ("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): dtype_}
    try:
        tower = cls.from_pretrained(folder, **kwargs).to(device_).eval()
    except Exception as e:  # noqa: BLE001 - a model folder is user input: one clear line whatever broke
        raise VisionZipError(f"{folder}: loading the tower failed ({type(e).__name__}: {_first_line(e)})") from e
    return VisionEncoder(tower, Preprocess.from_config(processor, anyres=False), vision_feature_layer=vision_feature_layer)


@dataclass
class VisionTower:
    """A bare vision tower standing where a VLM does for encoding, compressing and previews (no language
    model: it cannot answer). ``real`` says whether it carries pretrained weights we know of."""

    encoder: VisionEncoder
    path: str
    real: bool = False
    family: FamilyModule = field(default_factory=BareTower)

    @property
    def model(self):
        return self.encoder.tower

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def to(self, device) -> VisionTower:
        self.encoder.tower.to(_pick_device(device))
        return self

    def video_encoder(self) -> VisionEncoder:
        return self.encoder


def video_source(vlm: VisionLanguageModel, source, *, scale_at_decode: bool = True, **sample_kwargs):
    """A handle to stream ``source`` (a path, file object, VideoHandle or FramesHandle) for this model.

    File videos are scaled while decoding to what the model's encoder needs (a small margin above its
    input size, see :meth:`~comfy_visionzip.encoder.VisionEncoder.decode_cover`) unless
    ``scale_at_decode`` is off or the handle already says how to scale.
    """
    if hasattr(source, "iter") and hasattr(source, "plan"):
        if sample_kwargs:
            raise VisionZipError(f"give sampling options ({', '.join(sample_kwargs)}) to the handle, not with it")
        handle = source
    else:
        handle = VideoHandle(source, **sample_kwargs)
    if scale_at_decode and isinstance(handle, VideoHandle) and handle.cover is None:
        handle = dataclasses.replace(handle, cover=vlm.video_encoder().decode_cover())
    return handle


def compress_video(
    vlm: VisionLanguageModel,
    source,
    *,
    dominant: int = 54,
    contextual: int = 10,
    method: str = "visionzip",
    batch_size: int | None = None,
    progress=None,
    scale_at_decode: bool = True,
    temporal=None,
    **sample_kwargs,
):
    """Sample -> encode -> zip a video file (or a VideoHandle / FramesHandle) in chunks with this model.

    ``sample_kwargs`` are :func:`~comfy_visionzip.video.iter_video`'s (num_frames, fps, start, end, ...).
    Frames are scaled at decode time to what the encoder needs (``scale_at_decode``), decoding overlaps
    encoding, and ``batch_size`` None sizes the batch to the device (halved on out-of-memory).
    ``temporal`` drops tokens that repeat earlier frames' (see :mod:`comfy_visionzip.temporal`; a
    threshold, a token budget, True or a ``Temporal``); a handle from the budget planner carries its
    room for visual tokens, which then becomes the stage's budget.
    Returns a :class:`~comfy_visionzip.encoder.CompressedVideo` labelled with the model it was made with.
    """
    handle = video_source(vlm, source, scale_at_decode=scale_at_decode, **sample_kwargs)
    total = len(handle.plan()[0])
    encoder = vlm.video_encoder()
    if not batch_size:
        batch_size = auto_batch_size(encoder)
    from .temporal import Temporal

    temporal = Temporal.parse(temporal)
    planned = getattr(handle, "token_budget", None)  # the budget planner's room for visual tokens
    if temporal is not None and temporal.budget is None and planned:
        temporal = temporal.with_budget(int(planned))
    video = compress_frames(encoder, handle.iter(chunk_size=batch_size), dominant=dominant,
                            contextual=contextual, method=method, batch_size=batch_size, progress=progress, total=total,
                            temporal=temporal)
    label_tokens(vlm, video)
    video.meta["duration"] = handle.duration()
    video.source = str(getattr(handle, "source", ""))
    return video


def token_identity(vlm: VisionLanguageModel) -> dict:
    """What tokens made with this model depend on: family, the tower (its config), select layer, grid, width.

    Recorded with every token set (and in tokens files) so that tokens from another model, or from the
    same family with another tower or settings, are refused with what differs.
    """
    encoder = vlm.video_encoder()
    vision = encoder.tower.config.to_dict()
    for key in ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "architectures", "_attn_implementation",
                "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict"):
        vision.pop(key, None)
    digest = hashlib.sha1(json.dumps(vision, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"family": vlm.family.model_type, "vision_hidden": vlm.family.token_width(vlm),
            "grid": list(encoder.grid), "select_layer": int(encoder.layer_index), "tower_layers": int(encoder.num_layers),
            "select_strategy": encoder.select_strategy, "tower": digest}


def label_tokens(vlm: VisionLanguageModel, video) -> None:
    """Record which model made the tokens (checked when they are answered from or loaded again)."""
    video.meta.update(model=vlm.name, **token_identity(vlm))
