"""The only place that touches ComfyUI, lazily and guarded, so nodes also run (and test) without it."""

from __future__ import annotations

import logging
import os
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
