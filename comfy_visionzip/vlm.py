"""Loading checkpoints: a vision-language model folder (:func:`load_vlm`) or a bare vision tower (:func:`load_tower`).

Supported (Hugging Face transformers classes, detected from ``config.json``'s ``model_type``):
LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``), LLaVA-NeXT-Video (``llava_next_video``),
Video-LLaVA (``video_llava``), LLaVA-OneVision (``llava_onevision``), Qwen2.5-VL (``qwen2_5_vl``),
Qwen3-VL (``qwen3_vl``).

Safe by default: weights load from ``.safetensors`` only (pickled ``.bin`` files need
``allow_pickle=True``), and ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import transformers
from safetensors import safe_open

from .devices import pick_device, pick_dtype
from .encoder import VisionEncoder
from .errors import VisionZipError
from .models import FAMILIES, FamilyModule, VisionLanguageModel
from .preprocess import Preprocess

log = logging.getLogger(__name__)


def _read_json(folder: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise VisionZipError(f"{path}: cannot read it as JSON ({e})") from e


def detect_family(folder: str) -> tuple[FamilyModule, dict[str, Any]]:
    """The family of the checkpoint in ``folder``, from its config.json; clear errors otherwise."""
    if not os.path.isdir(folder):
        raise VisionZipError(f"{folder}: not a folder")
    config = _read_json(folder, "config.json")
    if config is None:
        found = sorted(os.listdir(folder))[:8]
        raise VisionZipError(f"{folder}: no config.json, so not a Hugging Face model folder "
                             f"(it holds: {found or 'nothing'})")
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
        raise VisionZipError(f"{path}: no such model folder "
                             "(and not a Hugging Face id like 'llava-hf/llava-1.5-7b-hf')")
    try:
        from huggingface_hub import snapshot_download  # optional at run time: only for Hugging Face ids

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all mean "not available here"
        raise VisionZipError(f"{path}: not a local folder, and downloading it from Hugging Face failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                             "download it into a folder and give its path") from e


def _quantization_config(quantization: str | None, device: torch.device) -> Any:
    if quantization in (None, "none"):
        return None
    if quantization not in ("8bit", "4bit"):
        raise VisionZipError(f"unknown quantization {quantization!r}; valid: none, 8bit, 4bit")
    if device.type != "cuda":
        raise VisionZipError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); this device is {device.type}")
    try:
        import bitsandbytes  # noqa: F401  (optional dependency: 8/4-bit loading only)
    except ImportError as e:
        raise VisionZipError(f"{quantization} loading needs bitsandbytes: pip install bitsandbytes") from e
    if quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                                           bnb_4bit_quant_type="nf4")


def _processor_configs(folder: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    nested = _read_json(folder, "processor_config.json") or {}
    image = nested.get("image_processor") or _read_json(folder, "preprocessor_config.json")
    video = nested.get("video_processor") or _read_json(folder, "video_preprocessor_config.json")
    if image is None:
        raise VisionZipError(f"{folder}: no image processor settings "
                             "(preprocessor_config.json or processor_config.json)")
    return image, video


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:240]


def _check_safetensors(path: str) -> None:
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
    folder = resolve_model_path(path_or_id)
    family, config = detect_family(folder)
    cls = getattr(transformers, family.class_name, None)
    if cls is None:
        raise VisionZipError(f"{family.display} needs a newer transformers: "
                             f"this one ({transformers.__version__}) has no "
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
    device_ = pick_device(device)
    dtype_ = pick_dtype(dtype, device_)
    kwargs: dict[str, Any] = dict(attn_implementation=attn_implementation, use_safetensors=has_safetensors,
                                  trust_remote_code=False)
    quant = _quantization_config(quantization, device_)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device_.index or 0})
    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype_
    image_config, video_config = _processor_configs(folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the folder's tokenizer files are unusable
        raise VisionZipError(f"{folder}: its tokenizer cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                             "download the checkpoint's tokenizer files again "
                             "(tokenizer.json / tokenizer_config.json)") from e
    try:
        model = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - a model folder is user input: one clear line whatever broke
        raise VisionZipError(f"{folder}: loading the {family.display} weights failed ({type(e).__name__}: "
                             f"{_first_line(e)}); check that the folder is one complete checkpoint") from e
    if quant is None:
        model.to(device_)
    model.eval()
    log.info("loaded %s (%s) on %s in %s", folder, family.display, device_, dtype_)
    return VisionLanguageModel(model, family, folder, config, tokenizer, image_config, video_config, device_, dtype_,
                               quantized=quant is not None)


TOWER_CLASSES = {  # config.json model_type of a bare vision tower -> transformers class
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def load_tower(path: str | os.PathLike[str], *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, vision_feature_layer: int = -2,
               attn_implementation: str = "sdpa") -> VisionEncoder:
    """A bare vision tower from a transformers folder (config.json + safetensors + preprocessor_config.json)
    as a :class:`~comfy_visionzip.encoder.VisionEncoder` (for benches, heatmaps, the demo)."""
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
    device_ = pick_device(device)
    dtype_ = pick_dtype(dtype, device_)
    cls = getattr(transformers, TOWER_CLASSES[model_type])
    kwargs = {"attn_implementation": attn_implementation, "use_safetensors": True,
              ("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): dtype_}
    try:
        tower = cls.from_pretrained(folder, **kwargs).to(device_).eval()
    except Exception as e:  # noqa: BLE001 - a model folder is user input: one clear line whatever broke
        raise VisionZipError(f"{folder}: loading the tower failed ({type(e).__name__}: {_first_line(e)})") from e
    return VisionEncoder(tower, Preprocess.from_config(processor, anyres=False),
                         vision_feature_layer=vision_feature_layer)


