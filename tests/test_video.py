"""Frame-accurate sampling on generated clips whose frames carry their own number, and the real MKV."""

from __future__ import annotations

import io
import logging
from fractions import Fraction

import numpy as np
import pytest
import torch

from comfy_visionzip import VideoError, VideoHandle, VideoNotFoundError, VisionZipError, iter_video, sample_video
from comfy_visionzip.testing.synthetic import draw_frame, read_frame_number, set_mp4_rotation
from comfy_visionzip.video import BACKENDS, get_index
from comfy_visionzip.video.backends import backend_available

FORMATS = {
    "h264-mp4": dict(name="a.mp4", options={"g": "12"}),
    "h264-bframes-opengop-mkv": dict(name="b.mkv", options={"x264-params": "open-gop=1:keyint=12:bframes=3"}),
    "hevc-mp4": dict(name="c.mp4", codec="libx265", options={"x265-params": "keyint=15:log-level=error"}),
    "vp9-webm": dict(name="d.webm", codec="libvpx-vp9", options={"g": "15"}),
    "h264-mpegts": dict(name="e.ts", container="mpegts", options={"g": "10"}),
    "mpeg4-avi": dict(name="f.avi", codec="mpeg4", options={"g": "10"}),
    "ntsc-29.97-mp4": dict(name="g.mp4", fps=Fraction(30000, 1001), options={"g": "10"}),
    "film-23.976-mkv": dict(name="h.mkv", fps=Fraction(24000, 1001), options={"g": "10"}),
    "vfr-mp4": dict(name="i.mp4", frame_times=[k * 0.04 if k < 30 else 1.2 + (k - 30) * 0.1 for k in range(60)],
                    options={"g": "10"}),
    "with-audio-mp4": dict(name="j.mp4", audio=True, options={"g": "10"}),
}

PLANS = [dict(num_frames=7), dict(every=1), dict(fps=2.0), dict(num_frames=3, start=0.5, end=1.5), dict(max_frames=4)]


def _numbers(clip) -> list[int]:
    return [read_frame_number(f.numpy()) for f in clip.frames]


def _make(clip_factory, spec):
    spec = dict(spec)
    return clip_factory(spec.pop("name"), frames=60, **spec)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_frame_i_is_frame_i(clip_factory, fmt, backend):
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    path = _make(clip_factory, FORMATS[fmt])
    if backend == "decord" and fmt == "h264-mpegts":
        with pytest.raises(VideoError, match="decord is not used on 'mpegts' files"):
            sample_video(path, num_frames=4, backend=backend)
        return
    for plan in PLANS:
        clip = sample_video(path, backend=backend, **plan)
        assert clip.indices == sorted(set(clip.indices)), plan
        assert _numbers(clip) == clip.indices, (fmt, backend, plan)
        assert clip.frames.dtype == torch.uint8 and clip.frames.shape[1:] == (120, 160, 3)
        assert clip.backend == ("pyav" if backend == "auto" else backend)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_index_counts_every_frame_and_timestamps_match_the_encoder(clip_factory, fmt):
    spec = FORMATS[fmt]
    path = _make(clip_factory, spec)
    index = get_index(path)
    assert index.frame_count == 60
    if "frame_times" in spec:
        expected = np.array(spec["frame_times"])
    else:
        expected = np.arange(60) / float(Fraction(spec.get("fps", 30)))
    # container time bases round (MPEG-TS: 1/90000, Matroska: 1/1000): within a millisecond
    assert np.abs(index.timestamps - (expected - expected[0])).max() < 1.01e-3
    clip = sample_video(path, num_frames=5)
    assert clip.timestamps == [float(index.timestamps[i]) for i in clip.indices]
    assert clip.timestamps == sorted(clip.timestamps)
    assert clip.frame_count == 60


def test_variable_frame_rate_fps_plan_follows_time_not_frame_numbers(clip_factory):
    spec = FORMATS["vfr-mp4"]
    path = _make(clip_factory, spec)
    clip = sample_video(path, fps=2.0)
    # ticks every 0.5 s; frames 0..29 are 40 ms apart, then 100 ms apart from 1.2 s
    assert clip.indices[:3] == [0, 12, 25]
    assert all(abs(t - 0.5 * k) <= 0.05 + 1e-6 for k, t in enumerate(clip.timestamps))
    assert _numbers(clip) == clip.indices


def test_long_gop_sparse_plan_seeks_and_stays_exact(clip_factory):
    path = clip_factory("long.mp4", frames=600, size=(96, 64), options={"g": "50", "bf": "2"})
    clip = sample_video(path, num_frames=9)
    assert clip.indices == [0, 75, 150, 225, 300, 374, 449, 524, 599]
    assert _numbers(clip) == clip.indices
    # out-of-order neighbours (B-frames) around keyframes
    clip = sample_video(path, start=49 / 30, end=52 / 30)
    assert clip.indices == [49, 50, 51] == _numbers(clip)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_display_matrix_rotation_is_applied(clip_factory, rotation):
    path = clip_factory("rot.mp4", frames=12, rotation=rotation)  # tkhd matrix in MP4
    for backend in [b for b in BACKENDS if backend_available(b)]:
        clip = sample_video(path, num_frames=3, backend=backend)
        expected_hw = (160, 120) if rotation in (90, 270) else (120, 160)
        assert tuple(clip.frames.shape[1:3]) == expected_hw, backend
        # the display matrix angle is counter-clockwise: undo it to read the numbers
        upright = [read_frame_number(np.rot90(f.numpy(), k=-rotation // 90)) for f in clip.frames]
        assert upright == clip.indices, backend


def test_phone_portrait_video_comes_out_portrait(clip_factory, tmp_path):
    # A phone held upright stores landscape frames and a tkhd matrix "rotate 90 degrees clockwise".
    src = clip_factory("phone.mp4", frames=10, size=(160, 96))
    path = str(tmp_path / "phone.mp4")
    open(path, "wb").write(open(src, "rb").read())
    set_mp4_rotation(path, -90)
    data = open(path, "rb").read()
    pos = data.index(b"tkhd") - 4 + 48
    assert data[pos:pos + 16] == bytes.fromhex("00000000 00010000 00000000 ffff0000")  # an iPhone's matrix
    clip = sample_video(path, num_frames=2)
    assert tuple(clip.frames.shape[1:3]) == (160, 96)  # portrait
    first = clip.frames[0].numpy()
    # clockwise: the stored top-left (red marker) ends at the top-right
    assert first[1, -2, 0] > 200 and first[1, -2, 1] < 80
    assert read_frame_number(np.rot90(first, k=1)) == 0


def test_max_size_scales_the_longer_side(clip_factory):
    path = _make(clip_factory, FORMATS["h264-mp4"])
    for backend in [b for b in BACKENDS if backend_available(b)]:
        clip = sample_video(path, num_frames=3, max_size=80, backend=backend)
        assert tuple(clip.frames.shape[1:3]) == (60, 80)
        assert _numbers(clip) == clip.indices
    with pytest.raises(VisionZipError, match="max_size must be an integer >= 16"):
        sample_video(path, num_frames=3, max_size=3)


def test_iter_video_yields_bounded_chunks_equal_to_sample_video(clip_factory):
    path = _make(clip_factory, FORMATS["h264-bframes-opengop-mkv"])
    whole = sample_video(path, every=2)
    chunks = list(iter_video(path, every=2, chunk_size=7))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    assert sum((c.indices for c in chunks), []) == whole.indices
    assert sum((c.timestamps for c in chunks), []) == whole.timestamps
    assert torch.equal(torch.cat([c.frames for c in chunks]), whole.frames)


def test_iter_video_is_lazy_but_validates_first(clip_factory, tmp_path):
    with pytest.raises(VideoNotFoundError):
        iter_video(tmp_path / "nope.mp4", num_frames=3)  # raised at the call, not at the first next()
    path = _make(clip_factory, FORMATS["h264-mp4"])
    seen = []
    gen = iter_video(path, every=1, chunk_size=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == []  # nothing decoded yet
    next(gen)
    assert seen[:5] == [(1, 60), (2, 60), (3, 60), (4, 60), (5, 60)]


def test_progress_callback_can_cancel(clip_factory):
    path = _make(clip_factory, FORMATS["h264-mp4"])

    class Cancelled(Exception):
        pass

    def stop_at_3(done, total):
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_video(path, every=1, progress=stop_at_3)


def test_file_object_source(clip_factory):
    path = _make(clip_factory, FORMATS["h264-bframes-opengop-mkv"])
    data = io.BytesIO(open(path, "rb").read())
    clip = sample_video(data, num_frames=5)
    assert _numbers(clip) == clip.indices == [0, 15, 30, 44, 59]
    with pytest.raises(VideoError, match="reads files by path only"):
        sample_video(io.BytesIO(open(path, "rb").read()), num_frames=5, backend="opencv")


def test_video_handle_plans_without_decoding_and_streams(clip_factory):
    path = _make(clip_factory, FORMATS["vp9-webm"])
    handle = VideoHandle(path, num_frames=6)
    indices, times = handle.plan()
    chunks = list(handle.iter(chunk_size=4))
    assert sum((c.indices for c in chunks), []) == indices
    assert sum((c.timestamps for c in chunks), []) == times


# ------------------------------------------------------------------------------------- real-world file


def test_real_mkv_without_frame_count(real_clip):
    import av

    with av.open(real_clip) as c:
        assert c.streams.video[0].frames == 0  # the container does not say how many frames it has
        reference = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    index = get_index(real_clip)
    assert index.frame_count == len(reference) == 310
    clip = sample_video(real_clip, num_frames=8)
    assert clip.indices == [0, 44, 88, 132, 177, 221, 265, 309]
    assert clip.timestamps[0] == 0.0 and clip.timestamps[-1] == pytest.approx(10.3, abs=1e-3)
    assert abs(clip.duration - 10.333) < 0.01
    for i, frame in zip(clip.indices, clip.frames):
        assert np.array_equal(frame.numpy(), reference[i])  # bit-exact: the very same frame
    for backend in [b for b in BACKENDS if backend_available(b) and b != "pyav"]:
        other = sample_video(real_clip, num_frames=8, backend=backend)
        assert other.indices == clip.indices
        # other decoders convert YUV->RGB slightly differently; the frame must still be the same one
        diffs = [np.abs(a.numpy().astype(int) - reference[i].astype(int)).mean()
                 for i, a in zip(other.indices, other.frames)]
        neighbours = [np.abs(reference[i].astype(int) - reference[i + 1 if i + 1 < 310 else i - 1].astype(int)).mean()
                      for i in other.indices]
        assert all(d < 3 and d < n for d, n in zip(diffs, neighbours)), (backend, diffs, neighbours)


# ----------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(VideoNotFoundError) as err:
        sample_video(tmp_path / "missing.mp4", num_frames=4)
    assert "missing.mp4: file not found" in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty (0 bytes)"),
        (b"this is not a video, just some text\n" * 20, "not a readable video file"),
        (bytes(range(256)) * 64, "not a readable video file"),
    ],
)
def test_not_a_video(tmp_path, content, message):
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError) as err:
        sample_video(path, num_frames=4)
    assert str(path) in str(err.value) and message in str(err.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(VideoError, match="is a folder"):
        sample_video(tmp_path, num_frames=4)


def test_audio_only_file(tmp_path):
    import av

    path = str(tmp_path / "voice.m4a")
    with av.open(path, "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(VideoError, match=r"has no video stream \(it holds: audio\)"):
        sample_video(path, num_frames=4)


def test_truncated_mp4_without_index_is_a_clear_error(clip_factory, tmp_path):
    data = open(_make(clip_factory, FORMATS["h264-mp4"]), "rb").read()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])  # the moov box (the index) is at the end: lost
    with pytest.raises(VideoError, match="cut.mp4"):
        sample_video(path, num_frames=4)


def test_truncated_mkv_returns_the_frames_that_exist(clip_factory, tmp_path, caplog):
    data = open(_make(clip_factory, FORMATS["h264-bframes-opengop-mkv"]), "rb").read()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with caplog.at_level(logging.WARNING):
        clip = sample_video(path, num_frames=5)
    assert 0 < clip.frame_count < 60
    assert _numbers(clip) == clip.indices  # every returned frame is the frame it claims to be


def test_corrupt_middle_keeps_going_and_timestamps_stay_true(clip_factory, tmp_path, caplog):
    data = bytearray(open(_make(clip_factory, FORMATS["h264-bframes-opengop-mkv"]), "rb").read())
    rng = np.random.default_rng(0)
    lo, hi = len(data) * 2 // 5, len(data) * 3 // 5
    data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.mkv"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        clip = sample_video(path, every=1)
    numbers = _numbers(clip)
    # Frame numbers count the frames that can still be read; what must stay true is that every frame's
    # timestamp is the time it was shown at, before and after the damage.
    assert numbers[:15] == list(range(15)) == clip.indices[:15]
    assert max(numbers) == 59  # decoding recovered after the damaged region
    readable = [(n, t) for n, t in zip(numbers, clip.timestamps) if n < 60]
    assert all(abs(t - n / 30) < 1e-3 for n, t in readable)
    assert any("undecodable" in r.message or "could not be decoded" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"start": 3.0, "end": 1.0}, "end (1 s) must be after start (3 s)"),
        ({"backend": "ffmpeg-cli"}, "unknown video backend 'ffmpeg-cli'; valid: auto, pyav, decord, opencv"),
        ({"fps": -1.0}, "fps must be a positive number"),
    ],
)
def test_bad_options_fail_before_the_file_is_touched(tmp_path, kwargs, message):
    with pytest.raises(VisionZipError) as err:
        sample_video(tmp_path / "does-not-matter.mp4", **kwargs)
    assert message in str(err.value)


def test_start_beyond_the_end_names_the_file_and_its_length(clip_factory):
    path = _make(clip_factory, FORMATS["h264-mp4"])
    with pytest.raises(VideoError) as err:
        sample_video(path, num_frames=3, start=30.0)
    assert path in str(err.value) and "the video is 2.000 s long" in str(err.value)


def test_draw_and_read_frame_number_roundtrip():
    for n in (0, 1, 255, 4097, 65535):
        assert read_frame_number(draw_frame(n, 160, 120)) == n


def test_explicit_frames(clip_factory):
    path = _make(clip_factory, FORMATS["hevc-mp4"])
    clip = sample_video(path, frames=[59, 3, 3, 31])
    assert clip.indices == [3, 31, 59] == _numbers(clip)
    with pytest.raises(VideoError, match="frame 60 does not exist; the video has frames 0..59"):
        sample_video(path, frames=[1, 60])
    with pytest.raises(VisionZipError, match="either frames or a plan"):
        sample_video(path, frames=[1], num_frames=3)


def test_truncated_faststart_mp4_returns_the_frames_that_exist(tmp_path, caplog):
    # moov first ("faststart", as streaming sites write MP4s): the index survives, the media data is cut
    import av

    path = tmp_path / "fs.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=30, options={"g": "10"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for k in range(120):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw_frame(k, 160, 120), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        clip = sample_video(cut, num_frames=8)
    assert 4 <= len(clip) <= 8 and _numbers(clip) == clip.indices
    assert any("truncated" in r.message for r in caplog.records)
