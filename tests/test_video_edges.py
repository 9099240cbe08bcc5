"""Video edge cases that used to give wrong results (issue 17): broken timestamps, raw streams, extreme shapes.

Each clip is made here with PyAV: frames are encoded normally, then their packets get the timestamps
under test before muxing. Every frame shows its number (see ``testing/synthetic.py``), so a test checks
that "frame i" really is the i-th frame of the stream.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from comfy_visionzip.__main__ import main
from comfy_visionzip.errors import VideoError
from comfy_visionzip.testing.synthetic import draw_frame, make_clip, read_frame_number
from comfy_visionzip.video import build_index, sample_video
from comfy_visionzip.video.backends import letterbox, read_decord

Stamp = Callable[[int, av.Packet], tuple[int | None, int | None]]
Logs = pytest.LogCaptureFixture
Out = pytest.CaptureFixture[str]


def write_clip(path: Path, frames: int, stamp: Stamp, *, container: str | None = None, rate: int | Fraction = 25,
               options: dict[str, str] | None = None, size: tuple[int, int] = (64, 48)) -> str:
    """Encode ``frames`` numbered frames with libx264; ``stamp(k, packet)`` -> (pts, dts) of the k-th packet."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=rate, options=dict(options or {"bf": "0", "g": "10"}))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        count = 0

        def mux(packets: list[av.Packet]) -> None:
            nonlocal count
            for packet in packets:
                packet.pts, packet.dts = stamp(count, packet)
                out.mux(packet)
                count += 1

        for k in range(frames):
            mux(stream.encode(av.VideoFrame.from_ndarray(draw_frame(k, *size), format="rgb24")))
        mux(stream.encode())
    return str(path)


def numbers(path: str, **kwargs: object) -> tuple[list[int], list[int], list[float]]:
    """(drawn frame numbers, planned indices, timestamps) of a sample."""
    clip = sample_video(path, **kwargs)  # type: ignore[arg-type]
    return [read_frame_number(f.numpy()) for f in clip.frames], clip.indices, clip.timestamps


def approximate_warnings(caplog: Logs) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "approximate" in r.getMessage()]


# ------------------------------------------------------------------------ 1. frames sharing one timestamp


def test_frames_sharing_one_timestamp_are_all_kept_in_decoding_order(tmp_path: Path, caplog: Logs) -> None:
    # before: 30 packets with pts 0 became 1 frame of 0.04 s
    path = write_clip(tmp_path / "same.mkv", 30, lambda k, p: (0, 0), container="matroska")
    with caplog.at_level(logging.WARNING):
        index = build_index(path)
    assert index.frame_count == 30 and index.fps == 25.0 and index.duration == pytest.approx(1.2)
    assert index.timestamps[:3].tolist() == [0.0, 0.04, 0.08] and not index.has_pts
    (warning,) = approximate_warnings(caplog)
    assert "30 frames carry only 1 distinct timestamp" in warning and "25 fps" in warning
    drawn, indices, times = numbers(path, num_frames=16)
    assert len(drawn) == 16 and drawn == indices and times[-1] == pytest.approx(1.16)


def test_a_few_repeated_timestamps_lose_no_frame(tmp_path: Path, caplog: Logs) -> None:
    path = write_clip(tmp_path / "dup.mkv", 40, lambda k, p: (k - (k == 5), k - (k == 5)), container="matroska")
    with caplog.at_level(logging.WARNING):
        index = build_index(path)
    assert index.frame_count == 40 and index.duration == pytest.approx(1.6)
    assert "1 of its 40 frames repeats another frame's timestamp" in approximate_warnings(caplog)[0]
    drawn, indices, _ = numbers(path, every=3)
    assert drawn == indices == list(range(0, 40, 3))


# ------------------------------------------------------------------------ 2. no timestamps in a container


@pytest.mark.parametrize("container,ext,tick", [("matroska", "mkv", "1/1000"), ("mp4", "mp4", "1/12800"),
                                                ("mpegts", "ts", "1/90000")])
def test_a_container_written_without_timestamps_is_timed_at_its_nominal_rate(
        tmp_path: Path, caplog: Logs, container: str, ext: str, tick: str,
) -> None:
    # before: the MKV's ticks (0, 1, 2 ... ms) were taken as times: 1000 fps, a 1.2 s clip reported as 0.03 s
    path = write_clip(tmp_path / f"nots.{ext}", 30, lambda k, p: (None, None), container=container)
    with caplog.at_level(logging.WARNING):
        index = build_index(path)
    assert index.frame_count == 30 and index.fps == 25.0 and index.duration == pytest.approx(1.2)
    (warning,) = approximate_warnings(caplog)
    assert f"its timestamps count frames, not time (one tick of {tick} s per frame" in warning
    assert "timed at its nominal 25 fps (30 frames, 1.20 s)" in warning
    drawn, indices, times = numbers(path, fps=5)
    assert drawn == indices == [0, 5, 10, 15, 20, 25] and times == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


# ------------------------------------------------------------------------ 3. timestamps that run backwards


@pytest.mark.parametrize("frames,gop", [(30, "10"), (8, "3")])
def test_reversed_timestamps_take_frames_in_decoding_order(tmp_path: Path, caplog: Logs, frames: int, gop: str) -> None:
    # before: 16 frames planned, 1 decoded ("frame 0 could not be decoded; returning frame 29 instead")
    # (Matroska keeps pts only: dts far below keeps the muxer's checks quiet)
    path = write_clip(tmp_path / f"reversed{frames}.mkv", frames, lambda k, p: (frames - 1 - k, k - 1000),
                      container="matroska", options={"bf": "0", "g": gop})
    with caplog.at_level(logging.WARNING):
        drawn, indices, times = numbers(path, num_frames=16)
    assert len(drawn) == min(frames, 16) and drawn == indices
    assert times[-1] == pytest.approx((frames - 1) / 25)
    assert "its timestamps run backwards" in approximate_warnings(caplog)[0]


# ------------------------------------------------------------------------ 4. raw elementary streams


@pytest.mark.parametrize("bframes", ["0", "3"])
def test_raw_h264_elementary_stream_decodes(tmp_path: Path, caplog: Logs, bframes: str) -> None:
    # before: "no frame of the video stream could be decoded (the file may be corrupt)"
    path = write_clip(tmp_path / f"raw{bframes}.h264", 30, lambda k, p: (p.pts, p.dts), container="h264",
                      options={"bf": bframes, "g": "12"})
    with caplog.at_level(logging.WARNING):
        index = build_index(path)
    assert (index.frame_count, index.fps, index.width, index.height) == (30, 25.0, 64, 48)
    assert index.duration == pytest.approx(1.2) and index.container_format == "h264"
    assert "it carries no timestamps" in approximate_warnings(caplog)[0]
    drawn, indices, times = numbers(path, num_frames=16)
    assert len(drawn) == 16 and drawn == indices and times[1] == pytest.approx(0.08)


def test_decord_refuses_a_video_without_usable_timestamps_in_one_line(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "nots.mkv", 10, lambda k, p: (None, None), container="matroska")
    with pytest.raises(VideoError, match="decord matches frames by timestamp") as err:
        list(read_decord(build_index(path), [0, 1], None))
    assert "\n" not in str(err.value) and "backend='pyav'" in str(err.value)


# ------------------------------------------------------------------------ ordinary video is left alone


@pytest.mark.parametrize("name,kwargs", [
    ("b.mp4", dict(options={"bf": "3", "b-pyramid": "normal", "g": "30"})),
    ("b.mkv", dict(options={"bf": "3", "g": "30"})),
    ("b.ts", dict(container="mpegts", options={"bf": "3", "g": "10"})),
    ("b.avi", dict(codec="mpeg4", options={"g": "10", "bf": "2"})),
    ("vfr.mkv", dict(frames=40, frame_times=[0.0, 0.01, 0.5, 0.51, 0.52] + [2.0 + 0.03 * i for i in range(35)])),
    ("fast.mp4", dict(fps=240, frames=48)),
])
def test_b_frames_and_variable_rate_keep_their_timestamps(
        clip_factory: Callable[..., str], caplog: Logs, name: str, kwargs: dict[str, Any],
) -> None:
    path = clip_factory(name, **kwargs)
    with caplog.at_level(logging.WARNING):
        index = build_index(path)
    assert index.has_pts and index.approximate == "" and not approximate_warnings(caplog)
    frames = kwargs.get("frames", 60)
    assert index.frame_count == frames
    if "frame_times" in kwargs:
        assert index.timestamps[:3].tolist() == [0.0, 0.01, 0.5]


# ------------------------------------------------------------------------ command line: warnings and sheets


def test_approximate_times_are_warned_on_the_command_line_without_v(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "same.mkv", 30, lambda k, p: (0, 0), container="matroska")
    result = subprocess.run([sys.executable, "-m", "comfy_visionzip", "frames", path, "--num-frames", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "30 frames carry only 1 distinct timestamp" in result.stderr and "approximate" in result.stderr
    assert "Traceback" not in result.stderr
    assert "4 frames  [0.00, 0.40, 0.76, 1.16] s" in result.stdout and "indices [0, 10, 19, 29]" in result.stdout


def test_letterbox_keeps_the_whole_frame_centred() -> None:
    tall = np.full((800, 16, 3), 200, np.uint8)
    tile = letterbox(tall, 96, 24)
    assert tile.shape == (96, 24, 3)
    lit = np.flatnonzero(tile[48, :, 0] == 200)
    assert lit.size >= 1 and abs(lit.mean() - 11.5) <= 1 and (tile[:, 0] == 24).all()
    assert letterbox(np.zeros((10, 20, 3), np.uint8), 10, 20).shape == (10, 20, 3)


@pytest.mark.parametrize("size,tile", [((16, 8000), (240, 960)), ((8000, 16), (240, 60))])
def test_contact_sheet_of_an_extreme_shape_is_bounded(
        tmp_path: Path, capsys: Out, size: tuple[int, int], tile: tuple[int, int],
) -> None:
    # before (16x8000): a 960x360048 PNG and 3.5 GB of memory
    path = make_clip(tmp_path / f"{size[0]}x{size[1]}.mp4", frames=10, size=size)
    out = tmp_path / "sheet.png"
    assert main(["frames", path, "--out", str(out)]) == 0
    assert f"letterboxed into {tile[0]}x{tile[1]} tiles" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (4 * tile[0], 3 * (tile[1] + 16))  # 10 tiles: 3 rows of 4, labels 16 px


def test_contact_sheet_of_a_tall_video_stays_small_in_memory(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "tall.mp4", frames=10, size=(16, 8000))
    out = tmp_path / "sheet.png"
    code = ("import resource, sys; from comfy_visionzip.__main__ import main; "
            f"rc = main(['frames', {path!r}, '--out', {str(out)!r}]); "
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.rsplit("peak", 1)[1])
    assert peak_mb < 1500  # torch alone is ~350 MB; it was 3.8 GB
    with Image.open(out) as image:
        assert image.size == (960, 2928)


def test_nominal_rate_fraction_is_kept(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "ntsc.mkv", 30, lambda k, p: (None, None), container="matroska",
                      rate=Fraction(30000, 1001))
    index = build_index(path)
    assert index.fps == pytest.approx(29.97, abs=0.01) and index.duration == pytest.approx(30 * 1001 / 30000, abs=1e-3)
