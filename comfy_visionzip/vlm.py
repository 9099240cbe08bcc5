"""Loading checkpoints: a vision-language model folder (:func:`load_vlm`) or a bare vision tower (:func:`load_tower`).

Supported (Hugging Face transformers classes, detected from ``config.json``'s ``model_type``):
LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``), LLaVA-NeXT-Video (``llava_next_video``),
Video-LLaVA (``video_llava``), LLaVA-OneVision (``llava_onevision``), Qwen2.5-VL (``qwen2_5_vl``),
Qwen3-VL (``qwen3_vl``).

Safe by default: weights load from ``.safetensors`` only (pickled ``.bin`` files need
``allow_pickle=True``), and ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from safetensors import safe_open

from .adapter import apply_adapter, read_adapter
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
    if config is None:  # never list what the folder holds: the path may come from a shared workflow
        raise VisionZipError(f"{folder}: no config.json, so not a Hugging Face model folder")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        supported = ", ".join(f"{f.display} ({t})" for t, f in FAMILIES.items())
        raise VisionZipError(f"{folder}: model_type {model_type!r} ({arch}) is not supported; supported: {supported}")
    return FAMILIES[model_type], config


def resolve_model_path(path_or_id: str, *, allow_download: bool = False) -> str:
    """A local folder as is; a Hugging Face id is downloaded (safetensors + configs) only with ``allow_download``
    (the command line's ``--download``): nothing reaches the network unless the user turned it on."""
    path = os.path.expanduser(str(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise VisionZipError(f"{path}: is a file; give the model's folder (the one with config.json)")
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise VisionZipError(f"{path}: no such model folder "
                             "(and not a Hugging Face id like 'llava-hf/llava-1.5-7b-hf')")
    if not allow_download:
        raise VisionZipError(f"{path}: no such model folder; to download the Hugging Face id {path!r}, allow it "
                             "(--download on the command line, allow_download=True in Python) or download it into "
                             "a folder and give its path")
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


def _index_shards(folder: str) -> list[str]:
    """The shard files ``model.safetensors.index.json`` names (none without an index). A shard must sit in the
    folder itself: a name with ``..`` or an absolute path would make the loader read a file outside it.
    (The check is on the names, not on resolved links: Hugging Face's cache links every file to its blobs.)"""
    index = _read_json(folder, "model.safetensors.index.json")
    if index is None:
        return []
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VisionZipError(f"{folder}: model.safetensors.index.json has no weight_map of tensor -> shard file "
                             "names; download the checkpoint again")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        parts = shard.replace("\\", "/").split("/")
        if not shard or os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or ":" in shard:
            raise VisionZipError(f"{folder}: model.safetensors.index.json names the shard {shard[:120]!r}, which is "
                                 "not inside the model folder; shards must sit next to the index: download the "
                                 "checkpoint again")
    return shards


def _check_shards(folder: str) -> None:
    missing = [s for s in _index_shards(folder) if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise VisionZipError(f"{folder}: weight shards listed in model.safetensors.index.json are missing: "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; download them too")


def _check_files(folder: str, files: list[str]) -> None:
    """Cheap checks of a model folder before anything is loaded: weights readable, shards present (and inside the
    folder), a tokenizer."""
    _check_shards(folder)
    for name in sorted(f for f in files if f.endswith(".safetensors")):
        _check_safetensors(os.path.join(folder, name))
    if not any(f in files for f in TOKENIZER_FILES):
        raise VisionZipError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                             "download the checkpoint's tokenizer files into the folder")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_loading_report() -> Iterator[None]:
    """Keep transformers' own missing/unexpected-keys table off stderr while a checkpoint loads (the caller refuses
    such a checkpoint in one line instead). A filter, removed afterwards, rather than a level: transformers 5.x
    reads its logger's level to decide what else to report."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_errors_only)
    try:
        yield
    finally:
        logger.removeFilter(_errors_only)


ATTENTION = ("sdpa", "eager", "flash_attention_2")  # the attention kernels a model may be loaded with


def check_attention(attn_implementation: object, dtype: torch.dtype) -> str:
    """``attn_implementation`` if this torch and transformers can run it, else one line naming what is missing and
    what to pick instead. Cheap (no weights read): checked before anything loads, so a missing flash-attn is not
    reported as a broken checkpoint after the weights were read.

    flash_attention_2 needs the flash-attn package, a CUDA GPU and fp16/bf16; it is not checked against the device
    the weights load on, since ComfyUI loads them on the CPU and moves them to the GPU to run."""
    if not isinstance(attn_implementation, str) or attn_implementation not in ATTENTION:
        raise VisionZipError(f"unknown attention {str(attn_implementation)[:60]!r}; valid: {', '.join(ATTENTION)} "
                             "(sdpa is fast everywhere)")
    if attn_implementation == "sdpa" and not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        raise VisionZipError(f"attention sdpa needs torch 2 or newer (this is {torch.__version__}): "
                             "pick attention eager, or upgrade torch")
    if attn_implementation != "flash_attention_2":
        return attn_implementation
    if importlib.util.find_spec("flash_attn") is None:
        raise VisionZipError("attention flash_attention_2 needs the flash-attn package, which is not installed: "
                             "pick attention sdpa (about as fast), or install flash-attn "
                             "(pip install flash-attn --no-build-isolation, CUDA GPUs only)")
    if not torch.cuda.is_available():
        raise VisionZipError("attention flash_attention_2 runs only on a CUDA GPU, and this torch sees none: "
                             "pick attention sdpa")
    if dtype not in (torch.float16, torch.bfloat16):
        raise VisionZipError(f"attention flash_attention_2 runs in fp16 or bf16, not {str(dtype).split('.')[-1]}: "
                             "pick dtype fp16 or bf16, or attention sdpa")
    if not transformers.utils.is_flash_attn_2_available():
        try:
            version = importlib.metadata.version("flash_attn")
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
        raise VisionZipError(f"flash-attn {version} is installed, but transformers {transformers.__version__} "
                             "cannot use it (too old, or built for another torch or CUDA): pick attention sdpa, "
                             "or reinstall flash-attn for this torch")
    return attn_implementation


def _from_pretrained(cls: Any, folder: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)``, refusing a checkpoint whose weights do not all fit the model: a missing
    tensor would silently be random (a missing projector answers with noise), an unexpected one means another
    model's weights. Tied weights (lm_head = embeddings) are not reported missing by transformers."""
    try:
        with _quiet_loading_report():
            model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a model folder is user input: one clear line whatever broke
        text = str(e)
        if "size mismatch" in text or "ignore_mismatched_sizes" in text:
            raise VisionZipError(f"{folder}: some {what} weights have shapes that do not fit its config.json; "
                                 "download the checkpoint again") from e
        attention = kwargs.get("attn_implementation")
        if attention and attention != "eager" and any(
                word in text.lower() for word in ("attn_implementation", "flash attention", "flashattention", "sdpa")):
            raise VisionZipError(f"{folder}: the {what} model cannot use attention {attention} in transformers "
                                 f"{transformers.__version__} ({_first_line(e)}); pick attention eager or sdpa") from e
        raise VisionZipError(f"{folder}: loading the {what} weights failed ({type(e).__name__}: "
                             f"{_first_line(e)}); check that the folder is one complete checkpoint") from e
    problems = []
    for kind in ("missing", "unexpected", "mismatched"):  # transformers 4.x lists, 5.x sets; mismatched: tuples
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(f"{kind}_keys") or ()))
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {kind}: {', '.join(keys[:3])}{more}")
    if problems:
        raise VisionZipError(f"{folder}: the checkpoint's weights do not match the {what} model "
                             f"({'; '.join(problems)}); it is incomplete or from another model: "
                             "download the checkpoint again")
    return model


def load_vlm(
    path_or_id: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    allow_pickle: bool = False,
    allow_download: bool = False,
    adapter: str | os.PathLike[str] | None = None,
) -> VisionLanguageModel:
    """Load a LLaVA-family checkpoint from a folder (or a Hugging Face id where the network allows).

    Args:
        device: "auto"/None (cuda > mps > cpu), "cuda", "cuda:1", "cpu", "mps".
        dtype: "auto"/None (fp16 on GPU, fp32 on CPU), "fp32", "fp16", "bf16".
        attn_implementation: "sdpa" (default), "eager", or "flash_attention_2" (flash-attn installed, a CUDA GPU,
            fp16/bf16); checked before anything is read (:func:`check_attention`).
        quantization: None, "8bit" or "4bit" (bitsandbytes, CUDA only).
        allow_pickle: also accept pickled ``.bin`` weights (only for files you trust).
        allow_download: download a Hugging Face id that is not a local folder (off: never touch the network).
        adapter: a projector adapter file (see :mod:`comfy_visionzip.adapter`) to use instead of the model's own
            projector; read before the model loads, refused after it when it was tuned for another model.
    """
    tuned = read_adapter(adapter) if adapter else None  # a missing or foreign file: before anything loads
    device_ = pick_device(device)  # cheap checks first: nothing is read for a device, dtype or kernel it cannot use
    dtype_ = pick_dtype(dtype, device_)
    check_attention(attn_implementation, dtype_)
    folder = resolve_model_path(path_or_id, allow_download=allow_download)
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
    model = _from_pretrained(cls, folder, family.display, **kwargs)
    if quant is None:
        model.to(device_)
    model.eval()
    log.info("loaded %s (%s) on %s in %s", folder, family.display, device_, dtype_)
    vlm = VisionLanguageModel(model, family, folder, config, tokenizer, image_config, video_config, device_, dtype_,
                              quantized=quant is not None)
    vlm.video_encoder()  # its processor settings checked against the tower now, not at the first video
    if tuned is not None:
        apply_adapter(vlm, tuned)
    return vlm


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
    device_ = pick_device(device)
    dtype_ = pick_dtype(dtype, device_)
    check_attention(attn_implementation, dtype_)
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
    _check_shards(folder)
    for name in (f for f in files if f.endswith(".safetensors")):
        _check_safetensors(os.path.join(folder, name))
    processor = _read_json(folder, "preprocessor_config.json")
    if processor is None:
        raise VisionZipError(f"{folder}: no preprocessor_config.json (how images become pixels)")
    cls = getattr(transformers, TOWER_CLASSES[model_type])
    kwargs = {"attn_implementation": attn_implementation, "use_safetensors": True,
              ("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): dtype_}
    tower = _from_pretrained(cls, folder, "tower", **kwargs).to(device_).eval()
    return VisionEncoder(tower, Preprocess.from_config(processor, anyres=False),
                         vision_feature_layer=vision_feature_layer)


