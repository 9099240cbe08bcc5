"""Decoding one plan in several processes: the plan is cut at keyframes into spans that decode independently,
worker processes decode them (each span frame-exactly, with ``decode.PlannedReader``, the same loop as in this
process) and the frames come back in order.

Why processes: FFmpeg's own frame threads stop scaling well past a handful of threads and pay a latency of one
frame per thread after every seek; two single-threaded decoders on two halves of a file beat one decoder with
two threads. A worker is ``python decode.py`` in effect (it imports av and numpy only, so it starts in a
fraction of a second and never loads torch), fed its job on stdin, answering on stdout with raw frames: no
pickle, no fork of a process that holds a model.

Order and memory: span ``j`` goes to worker ``j % workers``, and the frames are handed on span after span, so
each worker decodes ahead into a bounded queue (about ``QUEUE_BYTES`` of frames) and then waits: memory stays
bounded by the queue size x the workers whatever the video's length. Stopping the iteration (Cancel) kills the
workers at once. A worker that dies is not fatal: the frames it owed are decoded in this process (logged).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import VideoError, VisionZipError
from .backends import read_pyav
from .probe import StreamIndex

log = logging.getLogger(__name__)

DECODE_SCRIPT = Path(__file__).with_name("decode.py")
# how a worker starts: the script run by path with the current folder off sys.path (so nothing of the caller's
# folder shadows a module), its entry point called explicitly
BOOT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; import runpy; "
        "runpy.run_path(sys.argv[1], run_name='comfy_visionzip_decode_worker')['worker_main']()")
MIN_PARALLEL_FRAMES = 120  # 1080p frames to decode (estimated, smaller frames count for their share of
# pixels) below which starting workers does not pay (about a second of decoding on 2 cores)
SPAN_TARGETS = 16  # a span holds at least this many planned frames ...
SPAN_FRAMES = 120  # ... or this many frames to decode, unless the plan ends first
MAX_AUTO_WORKERS = 8
QUEUE_BYTES = 96 << 20  # decoded frames a worker may hold ahead of the consumer (at least 2 frames)
HEAD = struct.Struct("<iiqii")  # kind, span, position, height, width
FRAME, END, WARN, ERROR = 1, 2, 3, 4


def check_workers(workers: object) -> int | None:
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise VisionZipError(f"workers must be an integer from 1 to 64 (decode processes; 1 decodes here) or None "
                             f"(chosen from the plan and the cores), got {workers!r}")
    return workers


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _step_cost(index: StreamIndex, t: int, previous: int) -> int:
    """Frames decoded to reach planned frame ``t`` after planned frame ``previous``: from its keyframe, or from
    the frame after ``previous`` when no keyframe lies between them."""
    key = index.keyframe_at_or_before(t)
    return t - (key if key > previous else previous + 1) + 1


def spans(index: StreamIndex, frames: Sequence[int]) -> list[list[int]]:
    """The sorted plan cut into spans that decode independently: a cut falls only where a keyframe lies after a
    planned frame and at or before the next one (so no frame is decoded twice), once a span holds
    ``SPAN_TARGETS`` planned frames or ``SPAN_FRAMES`` frames to decode."""
    out: list[list[int]] = []
    cost = 0  # of the last span
    for t in sorted(set(int(f) for f in frames)):
        if out:
            span = out[-1]
            cut = index.keyframe_at_or_before(t) > span[-1]
            if not (cut and (len(span) >= SPAN_TARGETS or cost >= SPAN_FRAMES)):
                cost += _step_cost(index, t, span[-1])
                span.append(t)
                continue
        out.append([t])
        cost = _step_cost(index, t, -1)
    return out


def decode_cost(index: StreamIndex, frames: Sequence[int]) -> int:
    """Frames a plan decodes, about (see ``_step_cost``); skipped non-reference frames counted too."""
    cost, previous = 0, -1
    for t in sorted(set(int(f) for f in frames)):
        cost += _step_cost(index, t, previous)
        previous = t
    return cost


def choose_workers(index: StreamIndex, frames: Sequence[int], workers: int | None) -> int:
    """How many decode processes a plan gets: ``workers`` when given, else one per core (at most
    ``MAX_AUTO_WORKERS``) when the plan decodes enough frames to pay for starting them; 1 when it must be read
    here (a file object, a stream without timestamps, a plan of one span)."""
    if not isinstance(index.source, (str, os.PathLike)) or not index.has_pts:
        return 1
    parts = len(spans(index, frames))
    if workers is not None:
        return max(1, min(workers, parts))
    pixels = index.width * index.height / (1920 * 1080)
    if available_cores() < 2 or decode_cost(index, frames) * pixels < MIN_PARALLEL_FRAMES:
        return 1
    return max(1, min(available_cores(), MAX_AUTO_WORKERS, parts))


def parallel_reader(index: StreamIndex, frames: Sequence[int], workers: int | None) -> Any:
    """The PyAV reader for this plan: in worker processes when :func:`choose_workers` says so."""
    count = choose_workers(index, frames, workers)
    if count <= 1:
        return read_pyav
    return functools.partial(read_parallel, workers=count)


# ------------------------------------------------------------------------------------------- the parent side


class _Worker:
    def __init__(self, index: StreamIndex, jobs: list[tuple[int, list[int]]], size: tuple[int, int] | None,
                 threads: int, frame_bytes: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", BOOT, str(DECODE_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self.queue: queue.Queue[tuple[int, int, int, np.ndarray | str | None]] = queue.Queue(
            maxsize=max(2, QUEUE_BYTES // max(frame_bytes, 1)))
        self.stop = threading.Event()
        header = {"source": os.path.abspath(os.fspath(index.source)), "stream": index.stream_index,
                  "frames": int(index.pts.shape[0]), "keys": int(index.keyframes.shape[0]),
                  "rotation": index.rotation, "size": list(size) if size else None, "threads": threads,
                  "spans": jobs}
        self.thread = threading.Thread(target=self._pump, name="visionzip-decode-reader", daemon=True)
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(header).encode() + b"\n")
            self.process.stdin.write(np.ascontiguousarray(index.pts, "<i8").tobytes())
            self.process.stdin.write(np.ascontiguousarray(index.keyframes, "<i8").tobytes())
            self.process.stdin.close()
        except OSError:  # it died at once: the pump sees the end and the caller decodes its spans here
            pass
        self.thread.start()

    def _put(self, item: tuple[int, int, int, np.ndarray | str | None]) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        """Messages from the worker's stdout into the queue; (0, ...) when it ends."""
        out: IO[bytes] | None = self.process.stdout
        try:
            while out is not None and not self.stop.is_set():
                head = _read_exactly(out, HEAD.size)
                if head is None:
                    break
                kind, span, position, height, width = HEAD.unpack(head)
                if kind == FRAME:
                    data = _read_exactly(out, height * width * 3)
                    if data is None:
                        break
                    item: tuple[int, int, int, np.ndarray | str | None] = (
                        kind, span, position, np.frombuffer(data, np.uint8).reshape(height, width, 3))
                elif kind in (WARN, ERROR):
                    text = _read_exactly(out, height)
                    if text is None:
                        break
                    item = (kind, span, position, text.decode("utf-8", "replace"))
                else:
                    item = (kind, span, position, None)
                if not self._put(item):
                    return
        except (OSError, ValueError):  # the pipe was closed under us (we are stopping)
            pass
        self._put((0, -1, -1, None))

    def close(self) -> None:
        self.stop.set()
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kill that does not take
            log.warning("a decode worker did not stop")
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.thread.join(timeout=5)


def _read_exactly(stream: IO[bytes], count: int) -> bytearray | None:
    data = bytearray(count)
    view, got = memoryview(data), 0
    while got < count:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            return None
        got += n
    return data


def read_parallel(index: StreamIndex, frames: Sequence[int], size: tuple[int, int] | None, *,
                  workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """``read_pyav``'s frames, decoded by ``workers`` processes span by span, handed on in order."""
    parts = spans(index, frames)
    count = max(1, min(workers, len(parts)))
    if count == 1:
        yield from read_pyav(index, frames, size)
        return
    width, height = size if size is not None else (index.width, index.height)
    threads = max(1, available_cores() // count)
    pool: list[_Worker] = []
    try:
        for w in range(count):
            pool.append(_Worker(index, [(j, parts[j]) for j in range(w, len(parts), count)], size, threads,
                                width * height * 3))
    except OSError as e:  # no process can be started here (a sandbox, no interpreter at sys.executable)
        for worker in pool:
            worker.close()
        log.warning("decode workers cannot start (%s); decoding in this process", type(e).__name__)
        yield from read_pyav(index, frames, size)
        return
    try:
        for j, span in enumerate(parts):
            worker = pool[j % count]
            done: set[int] = set()
            lost = False
            while True:
                kind, at, position, payload = worker.queue.get()
                if kind == FRAME and isinstance(payload, np.ndarray):
                    done.add(position)
                    yield position, payload
                elif kind == WARN:
                    log.warning("%s", payload)
                elif kind == ERROR:
                    problem, _, hint = str(payload).partition("\n")
                    raise VideoError(index.source, problem, hint)
                elif kind == END and at == j:
                    break
                elif kind == 0:  # the worker ended without finishing its spans
                    lost = True
                    break
            if lost:
                try:
                    code: int | None = worker.process.wait(timeout=1)
                except subprocess.TimeoutExpired:  # its output closed, the process still there
                    code = None
                log.warning("%s: a decode worker stopped (exit code %s); decoding the rest in this process",
                            index.source, code)
                for other in pool:
                    other.close()
                rest = [t for t in span if t not in done] + [t for later in parts[j + 1:] for t in later]
                yield from read_pyav(index, rest, size)
                return
    finally:
        for worker in pool:
            worker.close()
