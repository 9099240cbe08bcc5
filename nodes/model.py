"""Load VLM: a LLaVA-family checkpoint from ComfyUI's models folder or any path."""

from __future__ import annotations

import os
import threading

from ..comfy_visionzip.vlm import load_vlm
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
        if self.vlm.device.type != "cpu" or self.target_device == "cpu" or getattr(self.vlm, "quantized", False):
            return self.vlm
        _comfy.make_room(self.vlm.model)
        return self.vlm.to(self.target_device)

    def __exit__(self, *exc):
        _comfy.release(self.vlm, self.keep_loaded)
        return False


class VisionZipLoadVLM:
    DESCRIPTION = ("Loads a LLaVA-family checkpoint (LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, Video-LLaVA, "
                   "LLaVA-OneVision) from ComfyUI/models/visionzip/<folder>, or from a path. Safetensors only; "
                   "remote code is never run.")
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
                    "tooltip": "A checkpoint folder in ComfyUI/models/visionzip (or models/LLM). Ignored when 'path' is set; the empty entry: none."}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {"default": "auto",
                                                             "tooltip": "auto: fp16 on GPU, fp32 on CPU."}),
                "device": (["auto", "cuda", "cpu", "mps"], {"default": "auto",
                                                            "tooltip": "auto: ComfyUI's GPU (or the CPU without one)."}),
                "quantization": (["none", "8bit", "4bit"], {"default": "none",
                                                            "tooltip": "Load the language model in 8 or 4 bits (needs bitsandbytes and a CUDA GPU)."}),
                "attention": (["sdpa", "eager", "flash_attention_2"], {"default": "sdpa",
                                                                       "tooltip": "Attention kernel. sdpa is fast everywhere; flash_attention_2 needs flash-attn."}),
                "keep_loaded": ("BOOLEAN", {"default": True,
                                            "tooltip": "Keep the model on the GPU between runs (off: moved to the CPU after each run, freeing VRAM)."}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": "A checkpoint folder anywhere, or a Hugging Face id (downloaded only where the network allows)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model):
        # Only `model` is named: ComfyUI checks the other inputs itself; `path` overrides it and is checked when run.
        if not model or os.path.isdir(_comfy.resolve_model(model)):
            return True
        return (f"model folder {model!r} is not in ComfyUI/models/visionzip: download it there (e.g. huggingface-cli "
                f"download llava-hf/{model} --local-dir ComfyUI/models/visionzip/{model}), pick another, or pick the "
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
                               attn_implementation=attention, quantization=None if quantization == "none" else quantization)
                vlm.quantized = quantization != "none"
                _CACHE.clear()  # one model at a time: a new choice frees the previous one
                _CACHE[key] = vlm
        return (ModelHandle(vlm, keep_loaded, target),)


def _auto_dtype(device: str) -> str:
    return "fp32" if device in ("cpu", "auto") else "fp16"


NODE_CLASS_MAPPINGS = {"VisionZipLoadVLM": VisionZipLoadVLM}
NODE_DISPLAY_NAME_MAPPINGS = {"VisionZipLoadVLM": "Load VLM (VisionZip)"}
