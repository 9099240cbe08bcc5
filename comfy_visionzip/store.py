"""Tokens files: the compressed tokens of a video in ``.safetensors`` with JSON metadata (encode once, ask later).

The metadata carries a format version. Format 2 (this version) records token positions and the
temporal stage's repeats beside the tokens and Qwen's dynamic resolution by name; format 1 files
(before that) are read and migrated: their tokens answer as before, and what needs positions (the
temporal stage, Qwen) says to encode again. A file of a newer format is refused with what to do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from .errors import VisionZipError
from .models.base import VisionLanguageModel
from .preprocess import DynamicResolution, Preprocess
from .tokens import CompressedVideo
from .zip import METHODS

FORMAT_NAME = "comfyui-visionzip/tokens"
VERSION = 2
FORMAT = f"{FORMAT_NAME}/{VERSION}"


def tokens_path(path: str | os.PathLike[str]) -> str:
    """Where :func:`save_tokens` writes for ``path`` (``.safetensors`` added when it is not there)."""
    path = os.fspath(path)
    return path if path.endswith(".safetensors") else path + ".safetensors"


def save_tokens(video: CompressedVideo, path: str | os.PathLike[str]) -> str:
    """Write the tokens (and heatmap maps, when present) with their settings, timestamps and model."""
    path = tokens_path(path)
    tensors = {"tokens": video.tokens.contiguous()}
    if video.scores is not None:
        tensors["scores"] = video.scores.contiguous()
    if video.assignment is not None:
        tensors["assignment"] = video.assignment.contiguous()
    if video.positions is not None:
        tensors["positions"] = video.positions.contiguous()
    if video.repeats is not None:
        tensors["repeats"] = video.repeats.contiguous()
    meta = {
        "format": FORMAT,
        "timestamps": video.timestamps, "indices": video.indices, "method": video.method,
        "dominant": video.dominant, "contextual": video.contextual, "crops": video.crops, "grid": list(video.grid),
        "cls_token": video.cls_token, "source": video.source, "meta": video.meta,
        "preprocess": dataclasses.asdict(video.preprocess) if video.preprocess is not None else None,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # atomically: a crash or a full disk never leaves a half-written file under the final name
    partial = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        save_file(tensors, partial, metadata={"visionzip": json.dumps(meta)})
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A tokens file's VisionZip metadata (what :func:`save_tokens` wrote beside the tensors), read without the
    tensors; None when the file is missing, not safetensors, or not a tokens file."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["visionzip"])
    except Exception:  # noqa: BLE001 - any failure means "not a tokens file" here
        return None
    return meta if isinstance(meta, dict) else None


def load_tokens(path: str | os.PathLike[str], *, model: VisionLanguageModel | None = None) -> CompressedVideo:
    """Read tokens saved by :func:`save_tokens` (any format version it knows). With ``model``, check they
    were made with that model."""
    if not isinstance(path, (str, os.PathLike)):
        raise VisionZipError(f"a tokens file is given by its path (str or os.PathLike), not a {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VisionZipError(f"{path}: tokens file not found")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not our file"
        raise VisionZipError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from e
    if "visionzip" not in header or "tokens" not in tensors:
        raise VisionZipError(f"{path}: a safetensors file, but not VisionZip tokens (no 'visionzip' metadata)")
    try:
        meta = json.loads(header["visionzip"])
    except ValueError as e:
        raise VisionZipError(f"{path}: its VisionZip metadata is not valid JSON ({e}); save the tokens again") from e
    if not isinstance(meta, dict):
        raise VisionZipError(f"{path}: its VisionZip metadata is a {type(meta).__name__}, not an object; "
                             "save the tokens again")
    meta = _migrate(path, meta)
    unknown = sorted(set(tensors) - TENSORS)
    if unknown:
        raise VisionZipError(f"{path}: unexpected tensors {unknown[:4]} in a tokens file; save the tokens again")
    try:
        _check_schema(meta)
        video = CompressedVideo(
            tokens=tensors["tokens"], timestamps=[float(t) for t in meta["timestamps"]],
            indices=[int(i) for i in meta["indices"]], method=meta["method"], dominant=meta["dominant"],
            contextual=meta["contextual"], crops=meta["crops"], grid=(int(meta["grid"][0]), int(meta["grid"][1])),
            cls_token=meta["cls_token"], scores=tensors.get("scores"), assignment=tensors.get("assignment"),
            preprocess=_preprocess(meta.get("preprocess")), source=meta.get("source", ""), meta=meta.get("meta", {}),
            positions=tensors.get("positions"), repeats=tensors.get("repeats"),
        )
        video.validate()
    except VisionZipError as e:
        raise VisionZipError(f"{path}: not usable tokens: {e}; save the tokens again") from None
    except (TypeError, ValueError) as e:  # a value of the wrong kind inside the preprocessing settings
        raise VisionZipError(f"{path}: not usable tokens: bad preprocessing settings ({e}); "
                             "save the tokens again") from None
    if model is not None:
        model.check_tokens(video)
    return video


TENSORS = {"tokens", "scores", "assignment", "positions", "repeats"}
# metadata key -> (what it must be, a check)
SCHEMA: dict[str, tuple[str, Any]] = {
    "timestamps": ("a list of numbers", lambda v: isinstance(v, list) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in v)),
    "indices": ("a list of whole numbers", lambda v: isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)),
    "method": (f"one of {', '.join(METHODS)}", lambda v: v in METHODS),
    "dominant": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "contextual": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "crops": ("a whole number >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "grid": ("[rows, cols]", lambda v: isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)),
    "cls_token": ("true or false", lambda v: isinstance(v, bool)),
    "meta": ("an object", lambda v: isinstance(v, dict)),
    "source": ("text", lambda v: isinstance(v, str)),
    "preprocess": ("an object or null", lambda v: v is None or isinstance(v, dict)),
}


def _check_schema(meta: dict[str, Any]) -> None:
    for key, (what, ok) in SCHEMA.items():
        if key not in meta and key in ("source", "preprocess"):
            continue
        if key not in meta:
            raise VisionZipError(f"its metadata has no {key!r}")
        if not ok(meta[key]):
            raise VisionZipError(f"its metadata's {key!r} must be {what}, not {str(meta[key])[:40]!r}")
    prep = meta.get("preprocess")
    if prep is not None and (set(prep) - {f.name for f in dataclasses.fields(Preprocess)}):
        raise VisionZipError(f"its preprocessing has unknown settings {sorted(set(prep))[:4]}")


def _version(path: str, meta: dict[str, Any]) -> int:
    name, _, number = str(meta.get("format", "")).rpartition("/")
    if name != FORMAT_NAME or not number.isdigit():
        raise VisionZipError(f"{path}: unknown tokens format {meta.get('format')!r} "
                             f"(this version reads {FORMAT} and older)")
    return int(number)


def _migrate(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata of any known format version as format :data:`VERSION` has it."""
    version = _version(path, meta)
    if version > VERSION:
        raise VisionZipError(f"{path}: tokens format {version} is newer than this ComfyUI-VisionZip reads ({VERSION}); "
                             "update the pack (or save the tokens again with this version)")
    if version == 1:  # Qwen's dynamic resolution was an unnamed 5-tuple "pixels"
        prep = dict(meta.get("preprocess") or {}) or None
        if prep is not None:
            pixels = prep.pop("pixels", None)
            prep["dynamic"] = (dict(zip(("factor", "min_pixels", "max_pixels", "patch", "temporal"), pixels))
                               if pixels else None)
        meta = {**meta, "preprocess": prep, "format": FORMAT}
    return meta


def _preprocess(values: dict[str, Any] | None) -> Preprocess | None:
    if values is None:
        return None
    fields: dict[str, Any] = {}
    for key, value in values.items():
        if key == "pinpoints" and value:
            value = tuple(tuple(p) for p in value)
        elif key == "dynamic" and value:
            value = DynamicResolution(**value)
        elif isinstance(value, list):
            value = tuple(value)
        fields[key] = value
    return Preprocess(**fields)
