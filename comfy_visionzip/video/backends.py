"""Decoder backends: PyAV (default), decord, OpenCV. The optional ones (decord, OpenCV) import their library lazily.

Every backend decodes the frames of a plan (positions in the :class:`StreamIndex`, presentation order)
and yields ``(position, rgb)`` with ``rgb`` a uint8 ``[H, W, 3]`` array in display orientation. The index
(built with PyAV, see ``probe.py``) is the single source of truth for what "frame i" is, so every
backend returns the same frames for the same plan.

Hazards handled here (each measured on real files; the PyAV loop itself is in ``decode.py``):
  - decord can hang on MPEG-TS and similar containers, counts MP4 edit-list pre-roll as frames, and
    its seeks return wrong frames on HEVC and open-GOP H.264: it is only used on containers in
    ``DECORD_SAFE_FORMATS``, reads in order from the start, and its frames are matched to ours by
    timestamp, not by its own frame numbers. ``auto`` never picks decord.
  - OpenCV's frame-position seek is wrong on variable-frame-rate video: the OpenCV backend never seeks;
    it grabs frames in order and counts them.
  - PyAV: a frame is identified by its presentation timestamp after every seek; if a demuxer lands
    after the wanted frame, we seek further back (finally from the start) instead of returning a wrong frame.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import VideoError, VisionZipError
from .decode import DecodeError, PlannedReader
from .decode import orient as _orient
from .probe import StreamIndex, open_container

log = logging.getLogger(__name__)

# Containers (FFmpeg demuxer names) on which decord has been seen to work; it can hang on others.
DECORD_SAFE_FORMATS = ("mov", "mp4", "matroska", "webm", "avi")

# read(index, frames, size) -> (position, rgb) for each planned frame; size: coded (width, height) or None
Reader = Callable[[StreamIndex, Sequence[int], tuple[int, int] | None], Iterator[tuple[int, np.ndarray]]]


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # the Python module it needs
    read: Reader
    note: str


def target_size(index: StreamIndex, max_size: int | None,
                cover: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """Coded (width, height) to scale decoded frames to, or None to keep the decoded size.

    ``max_size``: the longer display side is at most this. ``cover``: (height, width) of a box the
    scaled frame must still cover (aspect kept; never scaled up), e.g. a little more than what the
    vision encoder resizes to, so a 4K frame is not held at 4K just to be shrunk later.
    """
    scale = 1.0
    if max_size is not None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 16:
            raise VisionZipError(f"max_size must be an integer >= 16 (pixels) or None, got {max_size!r}")
        scale = min(scale, max_size / max(index.width, index.height))
    if cover is not None:
        width, height = index.display_size
        scale = min(scale, max(cover[0] / height, cover[1] / width))
    if scale >= 1.0:
        return None
    return max(2, round(index.width * scale)), max(2, round(index.height * scale))


def output_size(index: StreamIndex, max_size: int | None, cover: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) of the frames a backend yields, display orientation, after any scaling."""
    size = target_size(index, max_size, cover)
    width, height = size if size is not None else (index.width, index.height)
    return (width, height) if index.rotation in (90, 270) else (height, width)


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-downscale an RGB uint8 array to (width, height)."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    t = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="area")
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def letterbox(rgb: np.ndarray, height: int, width: int, fill: int = 24) -> np.ndarray:
    """An RGB uint8 ``[height, width, 3]`` tile showing all of ``rgb`` (aspect kept, centred, bars of ``fill``)."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    scale = min(width / max(w, 1), height / max(h, 1))
    new_w, new_h = min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale)))
    tile = np.full((height, width, 3), fill, dtype=np.uint8)
    y, x = (height - new_h) // 2, (width - new_w) // 2
    tile[y: y + new_h, x: x + new_w] = rgb if (new_w, new_h) == (w, h) else _resize(rgb, (new_w, new_h))
    return tile


# ----------------------------------------------------------------------------------------------- PyAV


def read_pyav(index: StreamIndex, frames: Sequence[int], size: tuple[int, int] | None, *,
              skip: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """The planned frames, frame-exactly (see ``decode.py``); ``skip``: let the decoder drop what no planned
    frame needs."""
    reader = PlannedReader(lambda: open_container(index.source), index.stream_index, index.pts, index.keyframes,
                           index.has_pts, index.rotation, size, source=str(index.source), skip=skip)
    try:
        yield from reader.read(frames)
    except DecodeError as e:
        raise VideoError(index.source, e.problem, e.hint) from None
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------- decord


def read_decord(index: StreamIndex, frames: Sequence[int],
                size: tuple[int, int] | None) -> Iterator[tuple[int, np.ndarray]]:
    source = index.source
    if not isinstance(source, str):
        raise VideoError(source, "the decord backend reads files by path only", "use backend='pyav'")
    fmt_names = set(index.container_format.split(","))
    if not fmt_names & set(DECORD_SAFE_FORMATS):
        raise VideoError(source, f"decord is not used on {index.container_format!r} files (it can hang on them)",
                         "use backend='pyav' (the default)")
    if not index.has_pts:
        raise VideoError(source, "decord matches frames by timestamp, and this video has no usable timestamps",
                         "use backend='pyav' (the default)")
    import decord  # optional dependency: the decord backend only

    kwargs: dict[str, Any] = {"ctx": decord.cpu(0), "num_threads": 0}
    if size is not None and index.rotation == 0:  # decord resizes rotated video wrongly: resize ourselves
        kwargs.update(width=size[0], height=size[1])
    try:
        reader = decord.VideoReader(source, **kwargs)
    except decord.DECORDError as e:
        raise VideoError(source, f"decord cannot open it ({str(e).splitlines()[0]})", "use backend='pyav'") from e
    # decord's seek (get_batch on sparse indices, seek_accurate, skip_frames) returned wrong frames on
    # HEVC and open-GOP H.264 here, so it only ever reads in order from the start; frames are matched to
    # ours by timestamp, as decord also numbers MP4 edit-list pre-roll as frames.
    n = len(reader)
    theirs = reader.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
    tb = float(index.time_base)
    wanted: dict[int, int] = {}  # decord frame number -> our position
    for t in sorted(set(frames)):
        want = float(index.pts[t]) * tb
        j = int(np.argmin(np.abs(theirs - want)))
        wanted.setdefault(j, t)
    last = max(wanted) if wanted else -1
    for j in range(last + 1):
        frame = reader.next()
        if j in wanted:
            rgb = frame.asnumpy()
            # decord applies the display rotation itself (same direction as ours); rotate only if it did not.
            if index.rotation in (90, 270) and rgb.shape[:2] == (index.height, index.width):
                rgb = _orient(rgb, index.rotation)
            if size is not None and index.rotation:
                rgb = _resize(rgb, size if index.rotation == 180 else (size[1], size[0]))
            yield wanted[j], rgb


# --------------------------------------------------------------------------------------------- OpenCV


def read_opencv(index: StreamIndex, frames: Sequence[int],
                size: tuple[int, int] | None) -> Iterator[tuple[int, np.ndarray]]:
    source = index.source
    if not isinstance(source, str):
        raise VideoError(source, "the opencv backend reads files by path only", "use backend='pyav'")
    import cv2  # optional dependency (opencv-python): the opencv backend only

    cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            raise VideoError(source, "OpenCV cannot open it", "use backend='pyav'")
        # We rotate ourselves (same code path as the other backends).
        if hasattr(cv2, "CAP_PROP_ORIENTATION_AUTO"):
            cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
        targets = sorted(set(frames))
        ti = 0
        i = -1
        while ti < len(targets):
            if not cap.grab():  # decodes the next frame in presentation order; no seeking (see module doc)
                log.warning("%s: OpenCV stopped after %d frames; frames %s.. not returned",
                            source, i + 1, targets[ti])
                return
            i += 1
            if i != targets[ti]:
                continue
            ok, bgr = cap.retrieve()
            ti += 1
            if not ok:
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if size is not None:
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            yield i, _orient(rgb, index.rotation)
    finally:
        cap.release()


BACKENDS: dict[str, Backend] = {
    "pyav": Backend("pyav", "av", read_pyav,
                    "default; seeks to keyframes for sparse plans, decodes through dense ones"),
    "decord": Backend("decord", "decord", read_decord,
                      "optional; mp4/mov/mkv/webm/avi only; reads in order from the start"),
    "opencv": Backend("opencv", "cv2", read_opencv, "optional; decodes in order from the start (no seeking)"),
}


def backend_available(name: str) -> bool:
    return importlib.util.find_spec(BACKENDS[name].module) is not None


def resolve_backend(name: str) -> Backend:
    """The backend called ``name`` (``auto`` = PyAV); unknown or missing ones get a clear error."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise VisionZipError(f"unknown video backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name == "auto":
        name = "pyav"
    if not backend_available(name):
        pkg = {"pyav": "av", "decord": "decord", "opencv": "opencv-python"}[name]
        raise VisionZipError(f"video backend {name!r} needs the {pkg!r} package: pip install {pkg}")
    return BACKENDS[name]
