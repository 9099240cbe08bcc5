"""Frame-exact decoding of planned frames with PyAV: the loop the PyAV backend runs, in this process or in decode
worker processes (see ``workers.py``).

This module imports only the standard library, av and numpy, and nothing else of the pack, so a worker process
that runs it as a script starts in a fraction of a second.

A frame is identified by its presentation timestamp after every seek (the index's ``pts``, ascending): if a
demuxer lands after the wanted frame, the reader seeks one keyframe further back (finally from the start)
instead of returning a wrong frame.

Skipping what no planned frame needs (``skip=True``, streams with timestamps): before each packet goes to the
decoder, FFmpeg's ``skip_frame`` is set for it (decoders read it per packet, frame threads included):
  - the packet's frame is planned: decode it;
  - the stretch between two keyframes that holds it also holds a planned frame other than its keyframe:
    ``NONREF``, drop frames no other frame is predicted from (dropping them cannot change any other frame);
  - otherwise (the stretch's only planned frame is its keyframe, or it holds none and is only passed
    through): ``NONINTRA``, drop everything but intra frames.
Stretches are taken in presentation order, so the leading frames of an open GOP (shown before their keyframe,
predicted from both sides) belong to the stretch before it, whose references they then keep.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import av
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

log = logging.getLogger("comfy_visionzip.video.backends")


class DecodeError(Exception):
    """A stream that cannot be read the way its index says (the caller names the file)."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem, self.hint = problem, hint


def orient(rgb: np.ndarray, rotation: int) -> np.ndarray:
    if rotation == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))  # np.rot90 turns counter-clockwise


class PlannedReader:
    """Decodes planned frames (positions in presentation order) of one video stream, frame-exactly.

    ``open_container()`` opens the file; the container stays open between :meth:`read` calls (a decode worker
    reads many spans of one file) until :meth:`close`. ``size``: (width, height) to scale to (area), or None.
    ``threads``: FFmpeg threads (0: FFmpeg's choice, frame and slice threads).
    """

    def __init__(self, open_container: Callable[[], InputContainer], stream_index: int, pts: np.ndarray,
                 keyframes: np.ndarray, has_pts: bool, rotation: int, size: tuple[int, int] | None, *,
                 source: str = "", threads: int = 0, skip: bool = True,
                 warn: Callable[[str], None] | None = None) -> None:
        self.open_container, self.stream_index = open_container, stream_index
        self.pts, self.keyframes, self.has_pts, self.rotation = pts, keyframes, has_pts, rotation
        self.size, self.source, self.threads, self.skip = size, source, threads, skip and has_pts
        self.warn = warn or log.warning
        self.container: InputContainer | None = None
        self.stream: VideoStream | None = None
        self.drain = self.skip  # turned off for good if a drained stretch did not give its planned frame
        self.drained = False
        self.bad_packets = 0
        self.fed = 0  # packets given to the decoder
        self.decoded = 0  # frames it returned (planned or not; frames dropped by ``skip`` are not returned)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = self.stream = None

    def _key_at_or_before(self, frame: int) -> int:
        pos = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[pos]) if pos >= 0 else 0

    def _reopen(self) -> VideoStream:
        self.close()
        self.container = self.open_container()
        found = self.container.streams[self.stream_index]
        if not isinstance(found, VideoStream):  # the index was made from this stream: the file changed
            raise DecodeError(f"stream {self.stream_index} is not a video stream", "the file changed after it was "
                                                                                  "indexed")
        found.thread_type = "AUTO"
        if self.threads:
            found.thread_count = self.threads
        self.stream = found
        return found

    def _packets(self, targets: Sequence[int], first: int) -> Iterator[VideoFrame]:
        """Decoded frames after the current position, for ``targets[first:]``; undecodable packets skipped
        (logged). With ``skip``, frames no other frame is predicted from are dropped unless planned, and the
        decoder is drained as soon as every planned frame up to the stretch being read has been fed to it (so it
        neither waits for more packets nor decodes frames past them): the generator then ends with
        ``self.drained`` set."""
        assert self.container is not None and self.stream is not None
        context = self.stream.codec_context
        pts, keyframes = self.pts, self.keyframes
        unfed = set(targets[first:])
        nxt = first  # targets[nxt] is the first target not yet fed
        fed_stretch = -2  # the furthest stretch (keyframe number) a fed target lies in
        mode: Any = "DEFAULT"
        self.drained = False
        if self.skip:
            context.skip_frame = mode  # an abandoned generator (a seek) may have left another setting
        for packet in self.container.demux(self.stream):
            p = -1
            if self.skip and packet.pts is not None:
                p = int(np.searchsorted(pts, packet.pts))
                if p >= len(pts) or pts[p] != packet.pts:
                    p = -1
                want: Any = "DEFAULT" if p < 0 or p in unfed else "NONREF"
                if want != mode:
                    context.skip_frame = mode = want
            self.fed += 1
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:  # a corrupt packet: skip it, keep going
                self.bad_packets += 1
                if self.bad_packets <= 3:
                    self.warn(f"{self.source}: skipping an undecodable packet at pts {packet.pts}: {e}")
                continue
            self.decoded += len(frames)
            yield from frames
            if p >= 0 and p in unfed:
                unfed.discard(p)
                fed_stretch = max(fed_stretch, int(np.searchsorted(keyframes, p, side="right")) - 1)
                while nxt < len(targets) and targets[nxt] not in unfed:
                    nxt += 1
                later = nxt < len(targets) and \
                    int(np.searchsorted(keyframes, targets[nxt], side="right")) - 1 > fed_stretch
                if self.drain and (nxt == len(targets) or later):
                    try:
                        frames = context.decode(None)  # drain: what the decoder still holds comes out now
                    except av.error.FFmpegError:  # corrupt data it held: what it could give is lost, read on
                        frames = []
                    self.decoded += len(frames)
                    context.skip_frame = "DEFAULT"
                    self.drained = True
                    yield from frames
                    return
        if self.skip and mode != "DEFAULT":
            context.skip_frame = "DEFAULT"

    def read(self, frames: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """``(position, rgb)`` for each of ``frames`` (sorted, duplicates dropped), rgb uint8 [H, W, 3] in display
        orientation; a frame that cannot be decoded is replaced by the next decodable one (logged)."""
        targets = sorted(set(int(f) for f in frames))
        if not targets:
            return
        width, height = self.size if self.size is not None else (None, None)
        interpolation = "AREA" if self.size is not None else None
        pts_list, keyframes = self.pts, self.keyframes
        ti = 0  # next target to produce
        pos = -1  # presentation position of the latest decoded frame
        frame_iter: Iterator[VideoFrame] | None = None
        backoff = 0  # how many keyframes further back than needed the next seek goes (after an overshoot)
        seek_pos, fresh, counted, started_at = 0, False, -1, 0
        while ti < len(targets):
            target = targets[ti]
            key = self._key_at_or_before(target)
            if frame_iter is None or (self.has_pts and key > pos + 1):
                # (Re)start decoding at a keyframe: the first time, after an overshoot, or when a keyframe lies
                # between the last decoded frame and the next target (a sparse plan: skip the gap).
                k = int(np.searchsorted(keyframes, key)) - backoff
                seek_pos = int(keyframes[k]) if k > 0 and self.has_pts else 0
                if seek_pos == 0 or self.container is None:
                    # From the very start: reopen rather than seek (some demuxers, e.g. MPEG-TS, land late).
                    stream = self._reopen()
                else:
                    assert self.stream is not None
                    stream = self.stream
                if seek_pos > 0:
                    assert self.container is not None
                    self.container.seek(int(pts_list[seek_pos]), stream=stream, backward=True, any_frame=False)
                    stream.codec_context.flush_buffers()
                frame_iter = self._packets(targets, ti)
                started_at = ti
                fresh = True
                counted = -1  # streams without timestamps are always read from the start, in order
            for frame in frame_iter:
                if self.has_pts and frame.pts is not None:
                    p = int(np.searchsorted(pts_list, frame.pts))
                    if p >= len(pts_list) or pts_list[p] != frame.pts:
                        continue  # a frame the index does not know (should not happen); ignore it
                else:
                    counted += 1
                    p = counted
                if fresh and p > target and seek_pos > 0:
                    backoff += 1  # the demuxer landed after the wanted frame: start further back
                    frame_iter = None
                    break
                fresh = False
                pos = max(pos, p)
                if p < target:
                    continue
                if p > target:  # frames in between were undecodable (corrupt data)
                    self.warn(f"{self.source}: frame {target} could not be decoded; returning frame {p} instead")
                backoff = 0
                rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation=interpolation)
                yield p, orient(rgb.to_ndarray(), self.rotation)
                while ti < len(targets) and targets[ti] <= p:
                    ti += 1
                break
            else:
                if self.drained:  # the decoder was drained after the planned frames it had: seek to the next ones
                    if ti == started_at:  # ... but it gave none of them (corrupt data): read on without draining
                        self.drain = False
                    frame_iter = None
                    continue
                if fresh and seek_pos > 0:
                    backoff += 1  # the seek landed past every frame (seen with MPEG-TS): start further back
                    frame_iter = None
                    continue
                if ti < len(targets):  # the stream ended before the remaining targets
                    self.warn(f"{self.source}: frames {targets[ti]}..{targets[-1]} could not be decoded (is the file "
                              "truncated?)")
                return


# ------------------------------------------------------------------------------------------- worker process


def worker_main() -> None:
    """A decode worker (see ``workers.py``): reads its job from stdin (a JSON line, then the index's pts and
    keyframes as little-endian int64), decodes its spans in order and writes each frame, span end, warning and
    error to stdout as a header (``kind, span, position, height, width`` as <iiqii) and its bytes."""
    head = struct.Struct("<iiqii")
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    job = json.loads(inp.readline())
    pts = np.frombuffer(inp.read(8 * job["frames"]), "<i8")
    keyframes = np.frombuffer(inp.read(8 * job["keys"]), "<i8")

    def say(kind: int, text: str) -> None:
        data = text.encode("utf-8", "replace")
        out.write(head.pack(kind, -1, -1, len(data), 0) + data)
        out.flush()

    source = job["source"]
    size = tuple(job["size"]) if job["size"] else None

    def open_source() -> InputContainer:
        try:
            return av.open(source, mode="r", metadata_errors="replace")
        except FileNotFoundError:
            raise DecodeError("file not found (moved or deleted while it was being read)") from None
        except (av.error.FFmpegError, OSError) as e:
            raise DecodeError(f"cannot be read any more ({type(e).__name__})", "was it changed while it was "
                                                                               "being read?") from None

    reader = PlannedReader(open_source, job["stream"], pts,
                           keyframes, True, job["rotation"], size, source=source, threads=job["threads"],
                           warn=lambda text: say(3, text))
    try:
        for number, span in job["spans"]:
            for position, rgb in reader.read(span):
                height, width = int(rgb.shape[0]), int(rgb.shape[1])
                out.write(head.pack(1, number, position, height, width))
                out.write(np.ascontiguousarray(rgb).tobytes())
            out.write(head.pack(2, number, -1, 0, 0))
            out.flush()
    except BrokenPipeError:  # the parent stopped reading (Cancel): nothing to say
        return
    except DecodeError as e:
        say(4, f"{e.problem}\n{e.hint}")
    except Exception as e:  # noqa: BLE001 - reported to the parent in one line, which names the file
        say(4, f"decode worker: {type(e).__name__}: {e}")
    finally:
        reader.close()
