"""Errors raised by the library.

Every error a user can cause (a bad file, a nonsense parameter, a model folder of the wrong kind) is a
``ValueError`` subclass whose message names the offending value and says how to fix it. Callers that
want to tell "my input is wrong" from "the library is broken" catch :class:`VisionZipError`.
"""

from __future__ import annotations

import os


class VisionZipError(ValueError):
    """Base class: the input (file, parameter, model) is not usable as given."""


class VideoError(VisionZipError):
    """A video cannot be read or sampled as asked. ``path`` names the file."""

    def __init__(self, path: object, problem: str, hint: str = "") -> None:
        self.path = _display_path(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The video file does not exist (also a ``FileNotFoundError``)."""


def _display_path(path: object) -> str:
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    name = getattr(path, "name", None)  # file objects
    return str(name) if isinstance(name, str) else f"<{type(path).__name__}>"


# ComfyUI imports custom node packs under their folder path as the module name, and shows that name with
# the error type; name the errors by the library's own module instead.
for _error in (VisionZipError, VideoError, VideoNotFoundError):
    _error.__module__ = "comfy_visionzip.errors"
