"""Probe a video with PyAV and index its frames without decoding them.

The index is built by demuxing the video stream's packets (no decoding: a 10-minute 1080p file is
indexed in a fraction of a second). Every packet is one frame; sorting the packets' presentation
timestamps gives the frames in presentation order, so frame ``i`` has timestamp ``pts[i]`` even when
the container reports no frame count (MKV, WebM, MPEG-TS), the rate is variable, or the stream has
B-frames. Packets an MP4 edit list marks as discarded (pre-roll) are not frames and are skipped.

Timestamps that cannot be presentation times (none at all, as in raw ``.h264`` elementary streams;
frames sharing one timestamp; timestamps that run backwards; timestamps that count frames in ticks of
the time base, e.g. an MKV written without timestamps reads as 1000 fps) are not trusted: frames are
then taken in decoding order, which the decoder turns into the true presentation order, and timed at
the stream's nominal rate. A warning says so, and :attr:`StreamIndex.approximate` says why.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from ..errors import VideoError, VideoNotFoundError, _display_path
from ..words import counted

log = logging.getLogger(__name__)

REORDER_WINDOW = 16  # frames: B-frame reordering moves a frame at most this far (the H.264/HEVC picture buffer)
MAX_NOMINAL_FPS = 1000  # a declared frame rate above this is not a playback rate (it is a time base)
DEFAULT_FPS = 25  # assumed when a stream without usable timestamps declares no frame rate either


@dataclass(frozen=True)
class StreamIndex:
    """Everything the planners and decoders need to know about one video stream."""

    source: Any  # the path (str) or file object it was read from
    container_format: str  # e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts"
    codec: str
    stream_index: int  # index of the video stream in the container
    time_base: Fraction
    pts: np.ndarray  # int64 [frame_count]: presentation timestamps, ascending (time_base units)
    keyframes: np.ndarray  # int64: positions (frame indices) of keyframes, ascending
    fps: float  # average frame rate (frame_count / duration when the container gives none)
    width: int  # coded size; display size swaps these when rotation is +-90
    height: int
    rotation: int  # counter-clockwise degrees to rotate decoded frames for display: 0, 90, 180, 270
    has_pts: bool  # False: no usable timestamps; frames are matched by decoding order, timed at the nominal rate
    approximate: str = ""  # why the times are approximate (the timestamps were not usable); "" when they are not

    @property
    def frame_count(self) -> int:
        return int(self.pts.shape[0])

    @property
    def timestamps(self) -> np.ndarray:
        """Seconds since the first frame, float64 [frame_count]."""
        seconds = (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)
        return np.round(seconds, 6)  # microseconds: no 2.9330000000000003 in prompts and logs

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one."""
        ts = self.timestamps
        last = 1.0 / self.fps if self.fps > 0 else 0.0
        return float(ts[-1] + last)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown to a viewer, rotation applied."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)

    def keyframe_at_or_before(self, frame: int) -> int:
        """Position of the last keyframe at or before ``frame`` (0 if there is none)."""
        pos = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[pos]) if pos >= 0 else 0


def open_container(source: Any) -> InputContainer:
    """``av.open`` with our errors: a missing, empty or non-video file names itself and the problem."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            if os.path.islink(path):  # a link whose target is missing, or links that loop
                raise VideoNotFoundError(path, "a link to no file (its target is missing, or the links loop)",
                                         "give the video file itself")
            relative = "" if os.path.isabs(path) else "; a relative path starts from the current folder"
            raise VideoNotFoundError(path, "file not found", f"check the path{relative}")
        if os.path.isdir(path):
            raise VideoError(path, "is a folder, not a video file")
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise VideoError(path, "is not a regular file (a FIFO, device or socket)",
                             "save the stream to a file first, then give that file")
        if os.path.getsize(path) == 0:
            raise VideoError(path, "file is empty (0 bytes)", "the copy or download may have failed")
    elif hasattr(source, "seek"):
        source.seek(0)
    try:
        return av.open(source, mode="r", metadata_errors="replace")
    except av.error.FileNotFoundError as e:
        raise VideoNotFoundError(source, "file not found") from e
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        cut = _truncated_mp4(source) if isinstance(source, (str, os.PathLike)) else None
        if cut:
            raise VideoError(source, cut, "the download or recording was cut short: download or copy it again; "
                                          "untrunc can rebuild the index from a good file of the same camera") from e
        raise VideoError(source, f"not a readable video file ({e.__class__.__name__}: {_short(e)})",
                         "is it a video? try opening it in a media player") from e


def _truncated_mp4(path: str | os.PathLike[str]) -> str | None:
    """Why an MP4/MOV that FFmpeg cannot open is truncated (its index missing), or None if it does not look so.

    MP4 files from cameras and downloads that are not "faststart" keep their index (the ``moov`` box)
    at the end, so a cut file has media data but no index. The top-level boxes tell: an ``ftyp`` box,
    then boxes whose sizes run past the end of the file or no ``moov`` at all.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            boxes: list[bytes] = []
            while offset + 8 <= size and len(boxes) < 64:
                f.seek(offset)
                head = f.read(16)
                length, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if length == 1 and len(head) >= 16:
                    length = int.from_bytes(head[8:16], "big")  # 64-bit box size
                boxes.append(kind)
                if length < 8:
                    break  # 0 = "to the end of the file"; anything else < 8 is garbage
                offset += length
    except OSError:
        return None
    if not boxes or boxes[0] != b"ftyp" or b"moov" in boxes:
        return None
    if offset > size:
        return (f"truncated MP4: it ends inside its {boxes[-1].decode('latin-1')!r} box ({size} of {offset} bytes) "
                "and its index (the 'moov' box, written at the end) is missing")
    return "an MP4 without its index (no 'moov' box): the file is incomplete"


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return text if len(text) < 200 else text[:200] + "..."


def pick_video_stream(container: InputContainer, source: Any) -> VideoStream:
    """The main video stream: the first one that is not cover art."""
    for stream in container.streams.video:
        disposition = getattr(stream, "disposition", None)
        attached = False
        if disposition is not None:
            try:
                attached = bool(disposition & 0x400)  # AV_DISPOSITION_ATTACHED_PIC: cover art
            except TypeError:
                attached = False
        if not attached:
            return stream
    kinds: list[str] = sorted({s.type for s in container.streams}) or ["nothing"]
    raise VideoError(source, f"has no video stream (it holds: {', '.join(kinds)})",
                     "give a video file, not audio or an image")


def _rotation_of(stream: VideoStream, first_frame: VideoFrame | None) -> int:
    """Counter-clockwise display rotation in degrees (0/90/180/270) from the display matrix."""
    angle = getattr(first_frame, "rotation", None) if first_frame is not None else None
    if angle is None:
        tag = stream.metadata.get("rotate") if stream.metadata else None  # older FFmpeg exported a tag (clockwise)
        try:
            angle = -float(tag) if tag is not None else 0.0
        except ValueError:
            angle = 0.0
    quarter = int(round(float(angle) / 90.0)) % 4
    return quarter * 90


def build_index(source: Any) -> StreamIndex:
    """Open ``source``, demux its video stream and return the frame index. Decodes one frame only."""
    with open_container(source) as container:
        stream = pick_video_stream(container, source)
        codec = stream.codec_context.name if stream.codec_context is not None else "unknown"
        try:
            av.codec.Codec(codec, "r")
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot decode"
            raise VideoError(source, f"video codec {codec!r} cannot be decoded by this FFmpeg build",
                             "re-encode it, e.g. to H.264") from e
        stamps: list[int] = []
        keys: list[bool] = []
        missing_count = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue  # flush packets; MP4 edit-list pre-roll is not a frame
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    missing_count += 1
                    ts = len(stamps)
                stamps.append(int(ts))
                keys.append(bool(packet.is_keyframe))
        except av.error.FFmpegError as e:
            if not stamps:
                raise VideoError(source, f"cannot read the video stream ({_short(e)})",
                                 "the file may be corrupt") from e
            log.warning("%s: stopped reading after %d frames: %s (the file may be truncated)",
                        _display(source), len(stamps), _short(e))
        if not stamps:
            raise VideoError(source, "the video stream holds no frames", "the file may be truncated or empty")

        time_base = stream.time_base or Fraction(1, 1000)
        key_flags = np.asarray(keys, dtype=bool)
        nominal = _nominal_rate(stream)
        raw = np.asarray(stamps, dtype=np.int64)
        why: str | None
        if missing_count:
            why = (f"{missing_count} of its {len(stamps)} frames carry no timestamp" if missing_count < len(stamps)
                   else "it carries no timestamps (a raw stream without a container?)")
        else:
            why = _unusable_timestamps(raw, key_flags, Fraction(time_base), nominal)
        approximate = ""
        if why is not None:
            # Decoding order: the decoder itself puts frames in presentation order; times from the nominal rate.
            assumed = nominal or Fraction(DEFAULT_FPS)
            time_base = Fraction(1, 1) / assumed
            pts = np.arange(len(stamps), dtype=np.int64)
            order = np.arange(len(stamps))
            approximate = (f"{why}: frames are taken in decoding order and timed at "
                           f"{'an assumed ' if nominal is None else 'its nominal '}{float(assumed):g} fps "
                           f"({counted(len(stamps), 'frame')}, {len(stamps) / float(assumed):.2f} s); "
                           "times are approximate")
            log.warning("%s: %s", _display(source), approximate)
        else:
            order = np.argsort(raw, kind="stable")
            pts = raw[order]
        key_arr = key_flags[order]
        keyframes = np.flatnonzero(key_arr).astype(np.int64)
        if keyframes.size == 0 or keyframes[0] != 0:
            keyframes = np.concatenate([[0], keyframes]).astype(np.int64)

        span = float((pts[-1] - pts[0]) * time_base)
        rate = stream.average_rate or stream.guessed_rate
        if len(pts) > 1 and span > 0:
            fps = (len(pts) - 1) / span  # the true average over the whole stream
        elif nominal is not None:
            fps = float(nominal)
        elif rate and float(rate) > 0:
            fps = float(rate)
        else:
            fps = 0.0

        first_frame = _first_frame(container, stream, source)
        rotation = _rotation_of(stream, first_frame)
        width = stream.codec_context.width or (first_frame.width if first_frame is not None else 0)
        height = stream.codec_context.height or (first_frame.height if first_frame is not None else 0)
        if first_frame is None:
            raise VideoError(source, "no frame of the video stream could be decoded", "the file may be corrupt")
        return StreamIndex(
            source=source,
            container_format=container.format.name,
            codec=codec,
            stream_index=stream.index,
            time_base=Fraction(time_base),
            pts=pts,
            keyframes=keyframes,
            fps=fps,
            width=int(width),
            height=int(height),
            rotation=rotation,
            has_pts=not approximate,
            approximate=approximate,
        )


def _first_frame(container: InputContainer, stream: VideoStream, source: Any) -> VideoFrame | None:
    """The first decodable frame. Raw streams (``.h264``) cannot seek: they are read again from the start."""
    try:
        container.seek(0, stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError:
        # A failed seek can leave the demuxer at the end (seen with raw H.264): read from a fresh container.
        with open_container(source) as fresh:
            found = fresh.streams[stream.index]
            return _decode_first(fresh, found) if isinstance(found, VideoStream) else None
    return _decode_first(container, stream)


def _decode_first(container: InputContainer, stream: VideoStream) -> VideoFrame | None:
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            if frames:
                return frames[0]
        return None
    except av.error.FFmpegError:
        return None


def _nominal_rate(stream: VideoStream) -> Fraction | None:
    """The frame rate the stream declares (container header or codec), or None when it declares no plausible one."""
    candidates = [getattr(stream, "guessed_rate", None), stream.average_rate, stream.base_rate]
    if stream.codec_context is not None:
        candidates.append(stream.codec_context.framerate)
    for rate in candidates:
        try:
            value = Fraction(rate) if rate else None
        except (TypeError, ValueError, ZeroDivisionError):
            value = None
        if value is not None and 0 < value <= MAX_NOMINAL_FPS:
            return value
    return None


def _unusable_timestamps(raw: np.ndarray, is_key: np.ndarray, time_base: Fraction,
                         nominal: Fraction | None) -> str | None:
    """Why packet timestamps (``raw``, decoding order; ``is_key`` marks keyframes) cannot be presentation
    times; None when they can.

    B-frames make timestamps go back and forth by a few frames, never further than the decoder's
    reorder window, and never make a keyframe show before one decoded earlier; anything else means
    the timestamps are broken, and sorting them would put the frames in a wrong order.
    """
    n = int(raw.shape[0])
    if n < 2:
        return None
    order = np.argsort(raw, kind="stable")
    ordered = raw[order]
    distinct = 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))
    if distinct < n:
        return (f"its {n} frames carry only {distinct} distinct timestamp{'s' if distinct != 1 else ''}"
                if distinct * 2 <= n else f"{n - distinct} of its {n} frames "
                f"{'repeats' if n - distinct == 1 else 'repeat'} another frame's timestamp")
    shift = int(np.max(np.abs(order - np.arange(n))))
    key_stamps = raw[is_key]
    if shift > REORDER_WINDOW or bool(np.any(np.diff(key_stamps) < 0)):
        return "its timestamps run backwards"
    if bool(np.all(np.diff(ordered) == 1)) and time_base > 0:
        tick_rate = 1 / time_base
        if (nominal is not None and tick_rate >= 2 * nominal) or (nominal is None and tick_rate > MAX_NOMINAL_FPS):
            said = f", while the stream says {float(nominal):g} fps" if nominal is not None else ""
            return (f"its timestamps count frames, not time (one tick of {time_base} s per frame would be "
                    f"{float(tick_rate):g} fps{said})")
    return None


def _display(source: Any) -> str:
    return _display_path(source)


# A small cache so that re-running a workflow on the same file does not demux it again. Keyed by
# the file's path, size and mtime: editing the file in place invalidates the entry.
_CACHE: OrderedDict[tuple[str, int, int], StreamIndex] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 16


def get_index(source: Any) -> StreamIndex:
    """:func:`build_index`, cached for paths (by path, size and mtime)."""
    if not isinstance(source, (str, os.PathLike)):
        return build_index(source)
    path = os.path.abspath(os.fspath(source))
    try:
        st = os.stat(path)
    except OSError:
        return build_index(source)  # raises the proper not-found error
    key = (path, st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    index = build_index(os.fspath(source))
    with _CACHE_LOCK:
        _CACHE[key] = index
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return index


def frame_seconds(index: StreamIndex, frame: int) -> float:
    """Absolute stream time (seconds, not relative to the first frame) of ``frame``."""
    return float(index.pts[frame]) * float(index.time_base)
