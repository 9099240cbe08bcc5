"""The only place that touches ComfyUI, lazily and guarded, so nodes also run (and test) without it."""

from __future__ import annotations

import json
import logging
import os
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


def model_roots() -> list[str]:
    """Folders holding checkpoint folders: ComfyUI/models/visionzip (registered on first use), models/LLM, ..."""
    try:
        import folder_paths
    except ImportError:
        return []
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if MODEL_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(MODEL_FOLDER, default)
    roots = list(folder_paths.get_folder_paths(MODEL_FOLDER))
    roots += [os.path.join(folder_paths.models_dir, name) for name in EXTRA_MODEL_FOLDERS]
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]


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


def make_room(model) -> None:
    """Ask ComfyUI to unload its other models so this one fits on the GPU."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    mm.free_memory(size * 1.2, mm.get_torch_device())


def release(vlm, keep_loaded: bool) -> None:
    """After a run: move the model to the offload device unless it should stay loaded."""
    if keep_loaded or vlm.quantized:
        return
    _load, offload = devices()
    vlm.to(offload)
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.soft_empty_cache()


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
