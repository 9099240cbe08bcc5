"""Save and load compressed tokens of a video (``.safetensors`` + JSON metadata): encode once, ask later."""

from __future__ import annotations

import dataclasses
import json
import os

from .encoder import CompressedVideo, Preprocess
from .errors import VisionZipError
from .projection import check_compatible

FORMAT = "comfyui-visionzip/tokens/1"


def save_tokens(video: CompressedVideo, path: str | os.PathLike[str]) -> str:
    """Write the tokens (and heatmap maps, when present) with their settings, timestamps and model."""
    from safetensors.torch import save_file

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


def load_tokens(path: str | os.PathLike[str], *, model=None) -> CompressedVideo:
    """Read tokens saved by :func:`save_tokens`. With ``model``, check they were made with that model."""
    from safetensors import safe_open

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
    meta = json.loads(header["visionzip"])
    if meta.get("format") != FORMAT:
        raise VisionZipError(f"{path}: unknown tokens format {meta.get('format')!r} (this version reads {FORMAT})")
    prep = meta.get("preprocess")
    if prep is not None:
        prep = Preprocess(**{k: (tuple(tuple(p) for p in v) if k == "pinpoints" and v else tuple(v) if isinstance(v, list) else v)
                             for k, v in prep.items()})
    video = CompressedVideo(
        tokens=tensors["tokens"], timestamps=meta["timestamps"], indices=meta["indices"], method=meta["method"],
        dominant=meta["dominant"], contextual=meta["contextual"], crops=meta["crops"], grid=tuple(meta["grid"]),
        cls_token=meta["cls_token"], scores=tensors.get("scores"), assignment=tensors.get("assignment"),
        preprocess=prep, source=meta.get("source", ""), meta=meta.get("meta", {}), positions=tensors.get("positions"),
        repeats=tensors.get("repeats"),
    )
    if model is not None:
        check_compatible(model, video)
    return video
