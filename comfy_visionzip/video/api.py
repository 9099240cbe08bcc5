"""Public video API: :func:`sample_video`, :func:`iter_video`, :class:`VideoClip`, :class:`VideoHandle`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import VideoError, VisionZipError
from ..words import counted
from .backends import Reader, _resize, output_size, resolve_backend, target_size
from .plan import check_plan_args, check_seek, plan_frames, snap_to_keyframes
from .probe import StreamIndex, get_index
from .workers import check_workers, parallel_reader

log = logging.getLogger(__name__)

# sample_video holds every frame it returns; above this many bytes it refuses (stream with iter_video instead)
SAMPLE_MAX_BYTES = 1 << 30

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each decoded frame. Raising from it stops the work."""


@dataclass
class VideoClip:
    """Sampled frames of one video (or one chunk of them, from :func:`iter_video`)."""

    frames: torch.Tensor  # uint8 [T, H, W, 3], RGB, display orientation
    timestamps: list[float]  # seconds since the first frame of the video, one per frame
    indices: list[int]  # source frame numbers (presentation order), one per frame
    fps: float  # the source's average frame rate
    duration: float  # the source's duration in seconds
    backend: str  # the decoder that produced the frames
    source: str = ""  # the file it came from
    frame_count: int = 0  # number of frames in the whole source stream
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: probe, plan, decode

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def to_image(self) -> torch.Tensor:
        """The frames as a ComfyUI IMAGE: float32 [T, H, W, 3] in 0..1."""
        return self.frames.to(torch.float32).div_(255.0)


@dataclass(frozen=True)
class VideoHandle:
    """A video and how to sample it, without any decoded frame: what nodes pass to the encoder.

    Cheap to hold and to copy; :meth:`iter` decodes chunk by chunk when asked. ``cover`` (height,
    width) scales frames down at decode time to what the encoder needs (see ``target_size``);
    ``picks`` replaces the plan by explicit frame numbers (what the budget planner chose).
    """

    source: Any
    num_frames: int | None = None
    fps: float | None = None
    every: int | None = None
    start: float = 0.0
    end: float | None = None
    max_frames: int | None = None
    backend: str = "auto"
    max_size: int | None = None
    cover: tuple[int, int] | None = None
    picks: tuple[int, ...] | None = None
    seek: str = "exact"
    workers: int | None = None

    def __post_init__(self) -> None:
        check_seek(self.seek)
        check_workers(self.workers)

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("num_frames", "fps", "every", "start", "end", "max_frames", "backend",
                                               "max_size", "cover", "seek", "workers")}

    def index(self) -> StreamIndex:
        return get_index(self.source)

    def plan(self) -> tuple[list[int], list[float]]:
        """(frame indices, timestamps) that :meth:`iter` will return, without decoding."""
        index = self.index()
        indices = list(self.picks) if self.picks is not None else _plan(index, self.options())
        ts = index.timestamps
        return indices, [float(ts[i]) for i in indices]

    def pick(self, indices: Sequence[int]) -> VideoHandle:
        """The same video with these frames (source frame numbers) instead of the plan."""
        return dataclasses.replace(self, picks=tuple(int(i) for i in indices))

    def seek_note(self, indices: Sequence[int] | None = None) -> str:
        """With ``seek="keyframe"``: how many of ``indices`` (default: the plan) a keyframe serves instead of the
        planned frame, and how far they moved at most; "" otherwise."""
        if self.seek != "keyframe":
            return ""
        index = self.index()
        moves = _snaps(index, self.options())
        shown = list(indices) if indices is not None else self.plan()[0]
        ts = index.timestamps
        wanted = set(shown)
        shifts = [abs(float(ts[k]) - float(ts[f])) for f, k in moves.items() if k in wanted]
        if not shifts:
            already = len(wanted & set(index.keyframes.tolist()))
            return (f"seek keyframe: no frame moved ({already} of {counted(len(shown), 'frame')} on keyframes "
                    "already, no keyframe near enough to the others)" if already < len(shown) else
                    f"seek keyframe: no frame moved (all {counted(len(shown), 'frame')} on keyframes already)")
        return (f"seek keyframe: {len(shifts)} of {counted(len(shown), 'frame')} served by a nearby keyframe "
                f"(moved at most {max(shifts):.2f} s; times are the keyframes' own)")

    def duration(self) -> float:
        return float(self.index().duration)

    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames :meth:`iter` yields (display orientation, after scaling)."""
        return output_size(self.index(), self.max_size, self.cover)

    def iter(self, chunk_size: int = 32, progress: Progress | None = None) -> Iterator[VideoClip]:
        if self.picks is not None:
            return iter_video(self.source, frames=list(self.picks), backend=self.backend, max_size=self.max_size,
                              cover=self.cover, chunk_size=chunk_size, progress=progress, workers=self.workers)
        return iter_video(self.source, chunk_size=chunk_size, progress=progress, **self.options())


@dataclass(frozen=True)
class FramesHandle:
    """Frames already in memory (e.g. a ComfyUI VIDEO made from images) behind the VideoHandle interface."""

    frames: torch.Tensor  # uint8 [N, H, W, 3] (a float 0..1 IMAGE is converted)
    frame_rate: float
    num_frames: int | None = None
    fps: float | None = None
    every: int | None = None
    start: float = 0.0
    end: float | None = None
    max_frames: int | None = None
    source: str = "<frames in memory>"
    picks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        frames = self.frames
        if frames.is_floating_point():
            object.__setattr__(self, "frames", (frames.clamp(0, 1) * 255).round().to(torch.uint8))
        if not (self.frame_rate and self.frame_rate > 0):
            raise VisionZipError(f"frame_rate must be positive, got {self.frame_rate!r}")

    def plan(self) -> tuple[list[int], list[float]]:
        if self.picks is not None:
            indices = list(self.picks)
        else:
            indices = plan_frames(int(self.frames.shape[0]), float(self.frame_rate), num_frames=self.num_frames,
                                  target_fps=self.fps, every=self.every, start=self.start, end=self.end,
                                  max_frames=self.max_frames)
        return indices, [round(i / float(self.frame_rate), 6) for i in indices]

    def pick(self, indices: Sequence[int]) -> FramesHandle:
        return dataclasses.replace(self, picks=tuple(int(i) for i in indices))

    def duration(self) -> float:
        return int(self.frames.shape[0]) / float(self.frame_rate)

    def frame_size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def iter(self, chunk_size: int = 32, progress: Progress | None = None) -> Iterator[VideoClip]:
        indices, times = self.plan()
        total = len(indices)
        for start in range(0, total, chunk_size):
            part = indices[start: start + chunk_size]
            if progress is not None:
                progress(min(start + chunk_size, total), total)
            yield VideoClip(self.frames[part], times[start: start + chunk_size], part, float(self.frame_rate),
                            self.frames.shape[0] / float(self.frame_rate), "memory", self.source,
                            int(self.frames.shape[0]))


def _plan(index: StreamIndex, options: dict[str, Any]) -> list[int]:
    """The plan's frames; with ``seek="keyframe"``, those a nearby keyframe serves replaced by it."""
    planned = _exact_plan(index, options)
    if options.get("seek", "exact") != "keyframe":
        return planned
    moves = _snaps(index, options, planned)
    return sorted(moves.get(i, i) for i in planned)


def _snaps(index: StreamIndex, options: dict[str, Any], planned: list[int] | None = None) -> dict[int, int]:
    planned = _exact_plan(index, options) if planned is None else planned
    if not index.has_pts:  # times are estimates: a keyframe's nearness cannot be judged; decode exactly
        return {}
    return snap_to_keyframes(index.timestamps.tolist(), index.keyframes.tolist(), planned,
                             start=options.get("start", 0.0) or 0.0, end=options.get("end"))


def _exact_plan(index: StreamIndex, options: dict[str, Any]) -> list[int]:
    try:
        return plan_frames(
            index.frame_count,
            index.fps,
            timestamps=index.timestamps.tolist(),
            num_frames=options.get("num_frames"),
            target_fps=options.get("fps"),
            every=options.get("every"),
            start=options.get("start", 0.0),
            end=options.get("end"),
            max_frames=options.get("max_frames"),
        )
    except VisionZipError as e:
        raise VideoError(index.source, str(e)) from e


def _explicit(index: StreamIndex, frames: Sequence[int], **plan_args: object) -> list[int]:
    given = [k for k, v in plan_args.items() if v is not None]
    if given:
        raise VisionZipError(f"give either frames or a plan ({', '.join(given)}), not both")
    try:
        picks = sorted({int(i) for i in frames})
    except (TypeError, ValueError) as e:
        raise VisionZipError(f"frames must be a list of frame numbers, got {frames!r}") from e
    if not picks:
        raise VisionZipError("frames is empty: give at least one frame number")
    if picks[0] < 0 or picks[-1] >= index.frame_count:
        raise VideoError(index.source, f"frame {picks[0] if picks[0] < 0 else picks[-1]} does not exist; "
                                       f"the video has frames 0..{index.frame_count - 1}")
    return picks


def iter_video(
    path: Any,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
    backend: str = "auto",
    every: int | None = None,
    max_size: int | None = None,
    frames: Sequence[int] | None = None,
    chunk_size: int = 32,
    progress: Progress | None = None,
    cover: tuple[int, int] | None = None,
    seek: str = "exact",
    workers: int | None = None,
) -> Iterator[VideoClip]:
    """Sample frames like :func:`sample_video`, yielding :class:`VideoClip` chunks of <= ``chunk_size`` frames.

    Only one chunk of decoded frames is held at a time, so a 1-hour video at 1 fps streams in bounded
    memory. Arguments are validated (and the file probed) before the first chunk is requested.
    ``cover=(height, width)`` scales frames down while decoding so that they still cover that box.
    ``seek`` and ``workers``: see :func:`sample_video`.
    """
    return _start(path, num_frames=num_frames, fps=fps, start=start, end=end, max_frames=max_frames, backend=backend,
                  every=every, max_size=max_size, frames=frames, chunk_size=chunk_size, progress=progress,
                  cover=cover, seek=seek, workers=workers)[0]


def _start(
    path: Any,
    *,
    num_frames: int | None,
    fps: float | None,
    start: float,
    end: float | None,
    max_frames: int | None,
    backend: str,
    every: int | None,
    max_size: int | None,
    frames: Sequence[int] | None,
    chunk_size: int,
    progress: Progress | None,
    cover: tuple[int, int] | None,
    seek: str = "exact",
    workers: int | None = None,
) -> tuple[Iterator[VideoClip], StreamIndex, list[int], tuple[int, int]]:
    """(chunk iterator, index, planned indices, output (height, width)); everything checked, nothing decoded."""
    check_plan_args(num_frames=num_frames, target_fps=fps, every=every, start=start, end=end, max_frames=max_frames)
    check_seek(seek)
    check_workers(workers)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise VisionZipError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chosen = resolve_backend(backend)
    t0 = time.perf_counter()
    if cover is not None and not (isinstance(cover, tuple) and len(cover) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in cover)):
        raise VisionZipError(f"cover must be a (height, width) pair of positive integers or None, got {cover!r}")
    index = get_index(path)
    size = target_size(index, max_size, cover)
    t1 = time.perf_counter()
    if frames is not None:
        indices = _explicit(index, frames, num_frames=num_frames, fps=fps, every=every, max_frames=max_frames)
    else:
        indices = _plan(index, {"num_frames": num_frames, "fps": fps, "every": every, "start": start, "end": end,
                                "max_frames": max_frames, "seek": seek})
    t2 = time.perf_counter()
    read = chosen.read
    if chosen.name == "pyav":
        read = parallel_reader(index, indices, workers)
    chunks = _iter_chunks(index, indices, chosen.name, read, size, chunk_size, progress,
                          {"probe": t1 - t0, "plan": t2 - t1})
    return chunks, index, indices, output_size(index, max_size, cover)


def _iter_chunks(
    index: StreamIndex,
    indices: Sequence[int],
    backend_name: str,
    read: Reader,
    size: tuple[int, int] | None,
    chunk_size: int,
    progress: Progress | None,
    timings: dict[str, float],
) -> Iterator[VideoClip]:
    ts = index.timestamps
    total = len(indices)
    done = 0
    buf: torch.Tensor | None = None  # (n, H, W, 3) uint8, filled in place: no second copy of a chunk
    filled = 0
    buf_idx: list[int] = []
    t_start = time.perf_counter()

    def flush(chunk: torch.Tensor) -> VideoClip:
        clip = VideoClip(
            frames=chunk[:filled] if filled < chunk.shape[0] else chunk,
            timestamps=[float(ts[i]) for i in buf_idx],
            indices=list(buf_idx),
            fps=index.fps,
            duration=index.duration,
            backend=backend_name,
            source=str(index.source),
            frame_count=index.frame_count,
            timings={**timings, "decode": time.perf_counter() - t_start},
        )
        buf_idx.clear()
        return clip

    last = -1
    # closed at once when the consumer stops or raises (Cancel): decode workers must not outlive it
    with contextlib.closing(read(index, indices, size)) as decoded:  # type: ignore[type-var]
        for position, rgb in decoded:
            if position == last:
                continue  # an undecodable frame was replaced by the next one, which is also planned
            last = position
            if buf is None or filled == buf.shape[0]:
                rows = min(chunk_size, total - done) if total > done else 1
                buf, filled = torch.empty((rows, *rgb.shape), dtype=torch.uint8), 0
            if rgb.shape != tuple(buf.shape[1:]):  # the stream changed resolution mid-way: match the first frames
                rgb = _resize(rgb, (buf.shape[2], buf.shape[1]))
            buf[filled] = torch.from_numpy(np.ascontiguousarray(rgb))
            filled += 1
            buf_idx.append(position)
            done += 1
            if progress is not None:
                progress(done, total)
            if filled == buf.shape[0]:
                yield flush(buf)
                buf = None
                t_start = time.perf_counter()
    if buf is not None and filled:
        yield flush(buf)
    elif done == 0:
        raise VideoError(index.source, "no frame could be decoded", "the file may be corrupt or truncated")


def sample_video(
    path: Any,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
    backend: str = "auto",
    every: int | None = None,
    max_size: int | None = None,
    frames: Sequence[int] | None = None,
    progress: Progress | None = None,
    cover: tuple[int, int] | None = None,
    max_bytes: int | None = SAMPLE_MAX_BYTES,
    seek: str = "exact",
    workers: int | None = None,
) -> VideoClip:
    """Decode the planned frames of a video file (or file object) into one :class:`VideoClip`.

    Every returned frame is held in memory, so the planned frames x their size is checked before
    anything is decoded: above ``max_bytes`` (default 1 GiB: e.g. 43 frames of 4K, 170 of 1080p) it
    raises instead of filling the memory. For long videos ask fewer frames, scale them (``max_size``)
    or stream them in chunks with :func:`iter_video`.

    Args:
        path: a video file path, or a seekable binary file object (PyAV backend only).
        num_frames: N frames uniformly over [start, end), first and last included.
        fps: frames per second of video to take (the frame nearest each 1/fps tick).
        every: every n-th frame. At most one of num_frames / fps / every; none means every frame
            (within the ``max_bytes`` cap).
        start, end: seconds; frames with start <= t < end are considered.
        max_frames: cap; a longer plan is thinned uniformly over the whole range.
        backend: "auto" (= "pyav"), "pyav", "decord" or "opencv".
        max_size: scale frames down so that the longer side is at most this many pixels.
        frames: explicit frame numbers to decode instead of a plan (e.g. a plan made earlier).
        progress: ``progress(done, total)`` after each frame; raise from it to cancel.
        cover: (height, width): scale frames down while decoding, keeping them at least this big.
        max_bytes: refuse plans whose frames would take more memory than this (None: no cap).
        seek: "exact" (default) decodes every planned frame exactly; "keyframe" serves a planned frame with a
            keyframe within half the sampling interval around it (one frame decoded instead of everything from
            the keyframe before it), keeping the keyframe's own index and timestamp; see ``snap_to_keyframes``.
        workers: decode worker processes for the PyAV backend (None: chosen from the plan and the cores, see
            ``workers.py``; 1: decode in this process).

    Raises:
        VideoError (a ValueError) naming the file and the problem; VisionZipError for bad options.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise VisionZipError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    chunks, index, indices, (height, width) = _start(
        path, num_frames=num_frames, fps=fps, start=start, end=end, max_frames=max_frames, backend=backend,
        every=every, max_size=max_size, frames=frames, chunk_size=1 << 30, progress=progress, cover=cover, seek=seek,
        workers=workers)
    need = len(indices) * height * width * 3
    if max_bytes is not None and need > max_bytes:
        fits = max(max_bytes // (height * width * 3), 1)
        raise VideoError(index.source, f"the plan holds {counted(len(indices), 'frame')} of {width}x{height} "
                                       f"({need / 2**30:.2f} GiB) in memory, over sample_video's cap of "
                                       f"{max_bytes / 2**30:.2f} GiB",
                         f"ask for at most {counted(fits, 'frame')} (num_frames / fps / max_frames), scale them "
                         "with max_size, or stream them with iter_video")
    return next(iter(chunks))
