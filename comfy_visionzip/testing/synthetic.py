"""Generated test clips whose frames carry their own frame number, for tests, the demo and benchmarks.

Each frame shows a moving colour gradient (so codecs have real motion to code) over a strip of 16
black/white cells at the bottom that spells the frame number in binary. :func:`read_frame_number`
reads it back from a decoded frame, so a test can check that "frame i" really is frame i after
seeking, on any container and codec, through lossy compression.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

BITS = 16  # frame numbers up to 65535 (36 minutes at 30 fps)


@functools.lru_cache(maxsize=8)
def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.arange(width, dtype=np.float32) / max(width, 1) * 6.28
    y = np.arange(height, dtype=np.float32) / max(height, 1) * 6.28
    xy = ((np.arange(height, dtype=np.float32)[:, None] + np.arange(width, dtype=np.float32)[None, :])
          / max(width + height, 1) * 6.28)
    return x, y, xy


def draw_frame(number: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 [height, width, 3]: a gradient that moves with ``number`` and the number in binary."""
    x, y, xy = _grid(width, height)
    phase = number * 0.15
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (127 + 100 * np.sin(x + phase))[None, :]
    img[..., 1] = (127 + 100 * np.sin(y - phase))[:, None]
    img[..., 2] = 127 + 100 * np.cos(xy + 2 * phase)
    img[:4, :4] = (255, 0, 0)  # a red corner marks the top-left, to check rotation
    strip = height // 4
    cell = width / BITS
    for b in range(BITS):
        on = (number >> (BITS - 1 - b)) & 1
        img[height - strip:, int(round(b * cell)):int(round((b + 1) * cell))] = 255 if on else 0
    return img


def read_frame_number(rgb: np.ndarray) -> int:
    """Inverse of :func:`draw_frame` on a decoded (upright, possibly rescaled) frame."""
    rgb = np.asarray(rgb)
    height, width = rgb.shape[:2]
    strip = height // 4
    luma = rgb[height - strip + strip // 4: height - strip // 4].astype(np.float32).mean(axis=(0, 2))
    cell = width / BITS
    number = 0
    for b in range(BITS):
        lo, hi = int(b * cell + cell / 4), int(math.ceil((b + 0.75) * cell))
        number = (number << 1) | int(luma[lo:max(hi, lo + 1)].mean() > 127)
    return number


def make_clip(
    path: str | os.PathLike[str],
    *,
    frames: int = 60,
    fps: float | Fraction = 30,
    size: tuple[int, int] = (160, 120),
    codec: str = "libx264",
    container: str | None = None,
    options: dict[str, str] | None = None,
    frame_times: Sequence[float] | None = None,
    rotation: int = 0,
    pix_fmt: str = "yuv420p",
    audio: bool = False,
) -> str:
    """Encode a numbered clip with PyAV and return its path.

    Args:
        frames: number of frames; frame k shows the number k.
        fps: nominal rate (Fraction(30000, 1001) for 29.97).
        frame_times: seconds per frame for variable frame rate clips (overrides the regular timing).
        rotation: display rotation in degrees, counter-clockwise (FFmpeg's display-matrix convention);
            MP4/MOV get it in the track header like phone videos, other containers as stream side data.
        codec / container / options: any encoder and muxer PyAV has ("libx264", "libx265", "libvpx-vp9",
            "mpeg4", ...; "mp4", "matroska", "webm", "mpegts", "avi", ...); options go to the encoder.
        audio: add a silent AAC track (to check that the video stream is the one picked).
    """
    path = os.fspath(path)
    width, height = size
    rate = Fraction(fps).limit_denominator(100000)
    with av.open(path, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, options=dict(options or {}))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        patch_tkhd = bool(rotation) and out.format.name in ("mp4", "mov")
        if rotation and not patch_tkhd:
            if not hasattr(stream, "set_display_rotation"):
                raise ValueError(f"rotation in {out.format.name!r} needs PyAV >= 15; use an .mp4 path")
            stream.set_display_rotation(rotation)
        audio_stream = out.add_stream("aac", rate=16000) if audio else None
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(draw_frame(k, width, height), format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[k] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio_stream is not None:
            duration = frames / float(rate)
            samples = np.zeros((1, int(duration * 16000)), np.float32)
            aframe = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            aframe.sample_rate = 16000
            for packet in audio_stream.encode(aframe):
                out.mux(packet)
            for packet in audio_stream.encode():
                out.mux(packet)
    if patch_tkhd:
        set_mp4_rotation(path, rotation)
    return path


def set_mp4_rotation(path: str, degrees: int) -> None:
    """Write a display rotation (counter-clockwise degrees) into an MP4's first track header.

    This is how phones mark portrait video: the frames are stored landscape and the ``tkhd`` matrix
    says how to turn them (an upright iPhone video carries ``a=0, b=1, c=-1, d=0``, i.e. -90 degrees).
    """
    theta = math.radians(degrees)
    cos, sin = round(math.cos(theta)), round(math.sin(theta))
    data = bytearray(open(path, "rb").read())
    pos = data.index(b"tkhd")
    offset = pos - 4 + (48 if data[pos + 4] == 0 else 60)  # box start + fixed fields of version 0 / 1
    matrix = (cos << 16, (-sin) << 16, 0, sin << 16, cos << 16, 0, 0, 0, 0x40000000)
    for k, value in enumerate(matrix):
        data[offset + 4 * k: offset + 4 * k + 4] = (value & 0xFFFFFFFF).to_bytes(4, "big")
    with open(path, "wb") as f:
        f.write(bytes(data))


def scene_frames(count: int, width: int, height: int, *, motion: str = "static", seed: int = 0) -> np.ndarray:
    """uint8 (count, height, width, 3) frames of a textured scene with a given kind of motion:

    ``static`` nothing moves; ``slow`` a square crosses the frame once over the clip; ``fast`` the camera
    pans (the whole scene shifts by 1/8 of its width each frame, wrapping around); ``cuts`` static shots
    of 4 different scenes, one after another (long static stretches with scene changes between).
    """
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(4 if motion == "cuts" else 1):
        blocks = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float32)
        texture = np.kron(blocks, np.ones((8, 8, 1), np.float32))[:height, :width]
        texture = np.pad(texture, ((0, height - texture.shape[0]), (0, width - texture.shape[1]), (0, 0)), mode="edge")
        scenes.append(texture)
    out = np.empty((count, height, width, 3), np.uint8)
    side = max(height // 4, 4)
    for i in range(count):
        if motion == "cuts":
            frame = scenes[min(i * 4 // max(count, 1), 3)].copy()
        elif motion == "fast":
            frame = np.roll(scenes[0], shift=(i * max(width // 8, 1)) % width, axis=1).copy()
        else:
            frame = scenes[0].copy()
        if motion == "slow":
            x = int((width - side) * i / max(count - 1, 1))
            y = (height - side) // 2
            frame[y: y + side, x: x + side] = (250, 40, 40)
        out[i] = frame.clip(0, 255).astype(np.uint8)
    return out


def make_scene_clip(path: str | os.PathLike[str], *, motion: str = "static", frames: int = 120, fps: float = 30,
                    size: tuple[int, int] = (320, 180), seed: int = 0, options: dict[str, str] | None = None) -> str:
    """An H.264 clip of :func:`scene_frames` (for the temporal stage's tests and benchmarks)."""
    path = os.fspath(path)
    width, height = size
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", **(options or {})}
        for image in scene_frames(frames, width, height, motion=motion, seed=seed):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
