"""Tokens files: the compressed tokens of a video in ``.safetensors`` with JSON metadata (encode once, ask later).

The metadata carries a format version. Format 2 (this version) records token positions and the
temporal stage's repeats beside the tokens and Qwen's dynamic resolution by name; format 1 files
(before that) are read and migrated: their tokens answer as before, and what needs positions (the
temporal stage, Qwen) says to encode again. A file of a newer format is refused with what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from .errors import VisionZipError
from .models.base import VisionLanguageModel
from .preprocess import DynamicResolution, Preprocess
from .tokens import CompressedVideo

FORMAT_NAME = "comfyui-visionzip/tokens"
VERSION = 2
FORMAT = f"{FORMAT_NAME}/{VERSION}"


def save_tokens(video: CompressedVideo, path: str | os.PathLike[str]) -> str:
    """Write the tokens (and heatmap maps, when present) with their settings, timestamps and model."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        path += ".safetensors"
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"visionzip": json.dumps(meta)})
    return path


def load_tokens(path: str | os.PathLike[str], *, model: VisionLanguageModel | None = None) -> CompressedVideo:
    """Read tokens saved by :func:`save_tokens` (any format version it knows). With ``model``, check they
    were made with that model."""
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
    meta = _migrate(path, meta)
    video = CompressedVideo(
        tokens=tensors["tokens"], timestamps=meta["timestamps"], indices=meta["indices"], method=meta["method"],
        dominant=meta["dominant"], contextual=meta["contextual"], crops=meta["crops"], grid=tuple(meta["grid"]),
        cls_token=meta["cls_token"], scores=tensors.get("scores"), assignment=tensors.get("assignment"),
        preprocess=_preprocess(meta.get("preprocess")), source=meta.get("source", ""), meta=meta.get("meta", {}),
        positions=tensors.get("positions"), repeats=tensors.get("repeats"),
    )
    if model is not None:
        model.check_tokens(video)
    return video


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
