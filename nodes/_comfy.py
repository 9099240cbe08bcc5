"""The only place that touches ComfyUI, lazily and guarded, so nodes also run (and test) without it."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".ts", ".mts", ".m2ts", ".flv", ".wmv",
                    ".mpg", ".mpeg", ".3gp", ".ogv", ".gif")


def input_directory() -> str | None:
    try:
        import folder_paths  # ComfyUI
    except ImportError:
        return None
    return folder_paths.get_input_directory()


def list_input_videos() -> list[str]:
    """Video files in ComfyUI's input folder (and its subfolders), for the file dropdown."""
    root = input_directory()
    if not root or not os.path.isdir(root):
        return []
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def resolve_input_path(name: str) -> str:
    """A dropdown entry ("clip.mp4", "sub/clip.mp4 [input]") or any path, as an absolute file path."""
    name = (name or "").strip().strip('"')
    if not name:
        return ""
    try:
        import folder_paths
    except ImportError:
        return os.path.abspath(os.path.expanduser(name))
    if os.path.isabs(os.path.expanduser(name)):
        return os.path.expanduser(name)
    try:
        return folder_paths.get_annotated_filepath(name)
    except Exception:  # noqa: BLE001 - fall back to the plain path; the loader reports a missing file
        return os.path.abspath(name)


def progress_callback(total: int) -> Callable[[int, int], None]:
    """A library ``progress(done, total)`` callback driving ComfyUI's progress bar and honouring Cancel."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except ImportError:
        return lambda done, total: None
    bar = comfy.utils.ProgressBar(max(int(total), 1))

    def progress(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()  # raises InterruptProcessingException on Cancel
        bar.update_absolute(done, total)

    return progress


MODEL_FOLDER = "visionzip"  # ComfyUI/models/visionzip/<checkpoint folder>
EXTRA_MODEL_FOLDERS = ("LLM", "llava")  # where other packs put VLMs; listed too when present


def _registered(name: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The existing folders of ComfyUI's model folder kind ``name`` (ComfyUI/models/<name>, registered on first use;
    extra_model_paths.yaml may add more), then models/<each of extra>; [] outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    roots = list(folder_paths.get_folder_paths(name))
    roots += [os.path.join(folder_paths.models_dir, other) for other in extra]
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]


def model_roots() -> list[str]:
    """Folders holding checkpoint folders: ComfyUI/models/visionzip (registered on first use), models/LLM, ..."""
    return _registered(MODEL_FOLDER, EXTRA_MODEL_FOLDERS)


def list_model_folders() -> list[str]:
    """Checkpoint folders of a supported family under the model roots: 'folder', or 'group/folder' one level
    down (other packs keep e.g. models/LLM/Qwen-VL/Qwen2.5-VL-3B-Instruct). Other models there (text LLMs,
    towers) are left out; a folder whose config.json cannot be read is listed, so that picking it says why."""
    found = []
    for root in model_roots():
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if os.path.isfile(os.path.join(folder, "config.json")):
                found += [name] if _is_vlm(folder) else []
            elif os.path.isdir(folder):
                found += [f"{name}/{sub}" for sub in sorted(os.listdir(folder)) if _is_vlm(os.path.join(folder, sub))]
    return list(dict.fromkeys(found))


def model_type_of(folder: str) -> str | None:
    """config.json's model_type, or None where there is none readable (never why: that would reveal the disk)."""
    config = os.path.join(folder, "config.json")
    try:
        if not os.path.isfile(config) or os.path.getsize(config) > (1 << 24):
            return None
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _is_vlm(folder: str) -> bool:
    """Listed in Load VLM: a supported family, or a config that cannot be read (picking it says what is wrong)."""
    from ..comfy_visionzip.models import FAMILIES

    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    kind = model_type_of(folder)
    return kind is None or kind in FAMILIES


def resolve_model(name: str) -> str:
    """A model folder name from the list as its full path ("" stays "": nothing picked; a name not in the
    model folders is returned as given)."""
    if not (name or "").strip():
        return ""
    return served_folder(name, model_roots()) or name


def devices() -> tuple[str, str]:
    """(load device, offload device) as ComfyUI's model management sees them; ("auto", "cpu") without it."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return "auto", "cpu"
    return str(mm.get_torch_device()), str(mm.unet_offload_device())


def manage(loaded, target: str, on_unload: Callable[[], None]):
    """Hand ``loaded`` (a VisionLanguageModel or VisionTower) to ComfyUI's model management, as ComfyUI's own
    models are: a ModelPatcher it sees, loads on its device (making room by offloading other models), offloads to
    the CPU when another model needs the room, and unloads on "Unload models" and ``POST /free``. ComfyUI's unload
    calls ``on_unload()``: the pack then forgets the model, so its memory comes back (it is loaded again from disk
    when next needed). None outside ComfyUI. ComfyUI holds the patcher only weakly: keep it while the model lives."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    import torch

    device = mm.get_torch_device() if target in ("", "auto") else torch.device(target)
    offload = device if device.type == "cpu" else mm.unet_offload_device()
    patcher = _patcher_class()(loaded, load_device=device, offload_device=offload)
    patcher.on_unload = on_unload
    return patcher


_PATCHER: list[type] = []


def _patcher_class() -> type:
    """A ModelPatcher subclass that moves the model whole. ComfyUI's own moves weights module by module and may leave
    part of a model on the CPU (its "lowvram" mode, which needs ComfyUI's own layers to cast weights as they run); a
    transformers model must sit on one device, so it is loaded or offloaded in one piece, and a model that cannot
    move (8/4-bit) stays where it is until it is unloaded."""
    if _PATCHER:
        return _PATCHER[0]
    import torch
    from comfy.model_patcher import ModelPatcher

    class VisionZipModel(torch.nn.Module):
        """The module ComfyUI manages: it sets attributes on it (``device`` ...) a transformers model refuses."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

    class WholeModelPatcher(ModelPatcher):
        def __init__(self, loaded, load_device, offload_device) -> None:
            self.loaded = loaded
            self.on_unload: Callable[[], None] = lambda: None
            if loaded.quantized:  # its weights stay on the GPU they were loaded on
                load_device = offload_device = loaded.device
            super().__init__(VisionZipModel(loaded.model), load_device=load_device, offload_device=offload_device)
            self.model.device = loaded.device

        def _move(self, device) -> None:
            if device is not None and not self.loaded.quantized:
                self.loaded.to(device)  # the module, its buffers, and the pack's own idea of the device
                self.model.device = device

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            self._move(device_to)
            self.model.model_lowvram = False
            self.model.lowvram_patch_counter = 0
            self.model.model_loaded_weight_memory = self.model_size()
            self.model.current_weight_patches_uuid = self.patches_uuid

        def partially_unload(self, device_to, memory_to_free=0):
            if self.loaded.quantized:
                return 0  # cannot move: ComfyUI then unloads it (detach), which frees it
            freed = self.model.model_loaded_weight_memory
            self._move(device_to)
            self.model.model_loaded_weight_memory = 0
            return freed

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                self._move(device_to)
            super().unpatch_model(None, unpatch_weights)
            if unpatch_weights:
                self.model.model_loaded_weight_memory = 0

        def detach(self, unpatch_all=True):
            model = super().detach(unpatch_all)
            if unpatch_all:  # unloaded ("Unload models", /free, or room for another model): the pack lets it go
                self.on_unload()
            return model

    _PATCHER[:] = [WholeModelPatcher]
    return WholeModelPatcher


def load(patcher) -> None:
    """Before a node uses the model: ComfyUI loads it on its device, making room as for its own models."""
    if patcher is None:
        return
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])


def unload(patcher) -> None:
    """Unload the model through ComfyUI now (ComfyUI forgets it; its detach tells the pack)."""
    if patcher is None:
        return
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is patcher:
            mm.current_loaded_models.pop(i).model_unload()


def give_back_memory() -> None:
    """After a model was let go: collect it, and hand the freed memory back to the system (the GPU cache through
    ComfyUI; on Linux the C heap too, where freed weights would otherwise stay in the process)."""
    gc.collect()
    try:
        import comfy.model_management as mm
    except ImportError:
        pass
    else:
        mm.soft_empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl ...): nothing to trim
            pass


_AFTER_RUN: dict[object, Callable[[], None]] = {}  # work waiting for the end of the run, by what it is
_AFTER_LOCK = threading.Lock()
_WATCHER: list[threading.Thread] = []


def after_run(work: Callable[[], None], what: object = None) -> None:
    """Do ``work`` once ComfyUI has no prompt running or waiting (one daemon thread looks twice a second while
    work waits; the same ``what`` waits only once). Outside ComfyUI it waits for :func:`run_pending` (the headless
    runner calls it when its run ends)."""
    with _AFTER_LOCK:
        _AFTER_RUN[what if what is not None else work] = work
        if queue_idle() is None or (_WATCHER and _WATCHER[0].is_alive()):
            return
        _WATCHER[:] = [threading.Thread(target=_watch, name="visionzip-after-run", daemon=True)]
        _WATCHER[0].start()


def run_pending() -> None:
    """Do the work that waits for the end of the run, now."""
    with _AFTER_LOCK:
        work = list(_AFTER_RUN.values())
        _AFTER_RUN.clear()
    for item in work:
        try:
            item()
        except Exception:  # noqa: BLE001 - freeing memory must never take the server down
            log.warning("VisionZip: could not free memory after the run", exc_info=True)


def _watch() -> None:
    while True:
        time.sleep(0.5)
        if queue_idle() is not False:
            run_pending()
        with _AFTER_LOCK:
            if not _AFTER_RUN:
                _WATCHER.clear()
                return


def queue_idle() -> bool | None:
    """Whether ComfyUI has no prompt running or waiting (None outside ComfyUI: nobody to ask)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    instance = getattr(PromptServer, "instance", None)
    queue = getattr(instance, "prompt_queue", None)
    if queue is None:
        return None
    return queue.get_tasks_remaining() == 0


_OUTPUT_OVERRIDE: list[str] = []  # set by the headless runner (--out); ComfyUI's own folder otherwise


def set_output_directory(path: str | None) -> None:
    """Where nodes write files outside ComfyUI (the headless runner's --out); None: back to the default."""
    _OUTPUT_OVERRIDE[:] = [os.path.abspath(path)] if path else []


def output_directory() -> str:
    if _OUTPUT_OVERRIDE:
        return _OUTPUT_OVERRIDE[0]
    try:
        import folder_paths
    except ImportError:
        return os.path.abspath("output")
    return folder_paths.get_output_directory()


def output_path(prefix: str, suffix: str) -> str:
    """A new numbered file for ``prefix`` inside the output folder. Like ComfyUI's own savers
    (folder_paths.get_save_image_path), a prefix that leaves the folder (``..``, an absolute path elsewhere) is
    refused, not resolved: a shared workflow never writes outside it."""
    text = (prefix or "").strip()
    root = os.path.abspath(output_directory())
    base = os.path.abspath(os.path.join(root, os.path.normpath(text))) if text else root
    if not within(base, root):
        raise ValueError(f"filename_prefix {text[:200]!r} leaves ComfyUI's output folder: Save Tokens writes only "
                         "inside it; give a relative prefix without '..', like 'visionzip/tokens'")
    if base == root:
        raise ValueError(f"filename_prefix {text[:200]!r} names no file: give one like 'visionzip/tokens'")
    folder, stem = os.path.split(base)
    os.makedirs(folder, exist_ok=True)
    n = 1
    while os.path.exists(os.path.join(folder, f"{stem}_{n:05d}{suffix}")):
        n += 1
    return os.path.join(folder, f"{stem}_{n:05d}{suffix}")


def within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, by the names (as ComfyUI's own savers check: a ``..`` or an
    absolute path elsewhere is outside; links are not followed, so a folder the user linked in stays usable)."""
    folder = os.path.abspath(folder)
    try:
        return os.path.commonpath((folder, os.path.abspath(path))) == folder
    except ValueError:  # another drive (Windows), or a mix of absolute and relative
        return False


def served_folder(name: str, roots: list[str]) -> str | None:
    """``name`` (a list entry) as a folder inside one of ``roots``; None if it is not one there. Nothing about a
    name that leads elsewhere is looked at, so the answer says nothing about the rest of the disk."""
    for root in roots:
        candidate = os.path.abspath(os.path.join(root, name))
        if within(candidate, root) and candidate != os.path.abspath(root) and os.path.isdir(candidate):
            return candidate
    return None


def tokens_file(chosen: str) -> str:
    """A Load Tokens path as a file inside ComfyUI's output or input folder (relative: the output folder first).
    Anything else is refused with the same line whether it exists or not: a workflow learns nothing about the
    rest of the disk."""
    text = chosen.strip().strip('"')
    roots = [os.path.abspath(r) for r in (output_directory(), input_directory()) if r]
    candidates = [os.path.abspath(os.path.join(root, os.path.normpath(text))) for root in roots]
    allowed = [c for c in dict.fromkeys(candidates) if c not in roots and any(within(c, r) for r in roots)]
    if not allowed:
        raise ValueError(f"tokens file {text[:200]!r} is not inside ComfyUI's output or input folder: Load Tokens "
                         "reads only there; pick a file in the list, or copy it into the output folder")
    return next((c for c in allowed if os.path.isfile(c)), allowed[0])


def text_streamer(node_id: str | None, *, every: float = 0.2) -> Callable[[str], None] | None:
    """An ``on_text(piece)`` callback that shows the text so far on node ``node_id`` while it is generated.

    Call it while the node runs. The "visionzip.text" messages it sends go only to the browser that queued the
    prompt (as ComfyUI's own "executing"/"executed" messages do) and carry the prompt id, so the web extension
    writes them only on the graph that ran this prompt. None outside ComfyUI, without a node id, or when no
    browser waits for the prompt (one queued through the API without a client id): nobody is there to see it."""
    if not node_id:
        return None
    try:
        from server import PromptServer  # ComfyUI's server
    except ImportError:
        return None
    instance = getattr(PromptServer, "instance", None)
    if instance is None or instance.client_id is None:
        return None
    client = instance.client_id  # the browser that queued the prompt now executing (ComfyUI sets it per prompt)
    message = {"node": str(node_id), "prompt_id": executing_prompt_id(), "text": ""}
    shown = {"at": 0.0}

    def on_text(piece: str) -> None:
        message["text"] += piece
        now = time.monotonic()
        if now - shown["at"] >= every:  # at most 5 messages a second
            shown["at"] = now
            instance.send_sync("visionzip.text", dict(message), client)

    return on_text


def executing_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing now (None outside a node's run, or on a ComfyUI too old to say)."""
    try:
        from comfy_execution.utils import get_executing_context  # older ComfyUI lacks it
    except ImportError:
        return None
    context = get_executing_context()
    return context.prompt_id if context is not None else None


def list_tokens_files() -> list[str]:
    """Tokens files (.safetensors) under ComfyUI's output folder, newest first, relative to it."""
    root = output_directory()
    found = []
    if os.path.isdir(root):
        for folder, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith(".safetensors"):
                    full = os.path.join(folder, name)
                    found.append((os.path.getmtime(full), os.path.relpath(full, root).replace(os.sep, "/")))
    return [name for _t, name in sorted(found, reverse=True)][:500]


ADAPTER_FOLDER = "visionzip_adapters"  # ComfyUI/models/visionzip_adapters/<file>.safetensors (tune-projector's)


def adapter_roots() -> list[str]:
    """Folders holding projector adapters: ComfyUI/models/visionzip_adapters (registered on first use)."""
    return _registered(ADAPTER_FOLDER)


def list_adapters() -> list[str]:
    """Adapter files (.safetensors) in the adapter folders, relative to them."""
    found = []
    for root in adapter_roots():
        for folder, _dirs, files in os.walk(root):
            found += [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in sorted(files)
                      if n.endswith(".safetensors")]
    return sorted(dict.fromkeys(found))


def resolve_adapter(name: str) -> str | None:
    """An adapter list entry as its file inside the adapter folders; None when it is not one there (nothing about
    a name that leads elsewhere is looked at)."""
    for root in adapter_roots():
        candidate = os.path.abspath(os.path.join(root, name))
        if within(candidate, root) and os.path.isfile(candidate) and candidate.endswith(".safetensors"):
            return candidate
    return None
