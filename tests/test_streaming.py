"""Bounded memory on every path: frames scaled at decode time to what the encoder needs, sample_video's
cap, the contact sheet's bounded thumbnails; decode overlapping encode; out-of-memory halving the batch."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_visionzip import VideoError, iter_video, sample_video
from comfy_visionzip.__main__ import main
from comfy_visionzip.pipeline import compress_frames, compress_video, video_source
from comfy_visionzip.stream import prefetch
from comfy_visionzip.testing.synthetic import read_frame_number
from comfy_visionzip.video import VideoHandle
from comfy_visionzip.vlm import load_vlm


@pytest.fixture(scope="module")
def sizes(clip_factory):
    """The same numbered content at three resolutions (16:9), like 4K / 1080p / 480p scaled down for speed."""
    return {h: clip_factory(f"res{h}.mp4", frames=6, size=(h * 16 // 9 // 2 * 2, h), options={"g": "3"})
            for h in (720, 360, 180)}


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_decoded_frames_do_not_depend_on_the_source_resolution(family, sizes, tiny_model_dir):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    cover = vlm.video_encoder().decode_cover()
    shapes = set()
    for _height, path in sizes.items():
        handle = video_source(vlm, path, num_frames=3)
        chunk = next(iter(handle.iter(chunk_size=3)))
        assert tuple(chunk.frames.shape[1:3]) == handle.frame_size()
        assert chunk.frames.shape[1] >= cover[0] or chunk.frames.shape[2] >= cover[1]  # still covers the box
        shapes.add(tuple(chunk.frames.shape))
    (shape,) = shapes  # 720p, 360p and 180p sources decode to the same frame size: memory per batch is equal
    assert shape[1] < 180


def test_scaling_at_decode_keeps_the_answer_of_the_full_size_frames_close(sizes, tiny_model_dir):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    scaled = compress_video(vlm, sizes[720], num_frames=3, method="full")
    full = compress_video(vlm, sizes[720], num_frames=3, method="full", scale_at_decode=False)
    assert scaled.tokens.shape == full.tokens.shape
    cos = torch.nn.functional.cosine_similarity(scaled.tokens.flatten(1), full.tokens.flatten(1))
    assert cos.min() > 0.99


def test_sample_video_refuses_a_plan_over_its_memory_cap(clip_factory):
    path = clip_factory("cap.mp4", frames=40, size=(320, 180))
    with pytest.raises(VideoError, match=r"the plan holds 40 frames of 320x180 .* over sample_video's cap") as info:
        sample_video(path, max_bytes=20 * 320 * 180 * 3)
    assert "ask for at most 20 frames" in str(info.value) and "iter_video" in str(info.value)
    assert len(sample_video(path, max_bytes=None)) == 40
    assert len(sample_video(path, num_frames=20, max_bytes=20 * 320 * 180 * 3)) == 20


def test_chunks_are_filled_in_place(clip_factory):
    path = clip_factory("inplace.mp4", frames=10, size=(64, 48))
    chunks = list(iter_video(path, chunk_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert all(c.frames.is_contiguous() and c.frames.dtype == torch.uint8 for c in chunks)
    assert [read_frame_number(f.numpy()) for c in chunks for f in c.frames] == list(range(10))


def test_frames_command_without_a_plan_and_on_a_long_plan_stays_bounded(clip_factory, tmp_path, capsys):
    path = clip_factory("sheet.mp4", frames=300, size=(320, 180), options={"g": "30"})
    assert main(["frames", path, "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "16 frames" in out and "no plan given: 16 frames spread over the video" in out
    assert main(["frames", path, "--every", "1", "--out", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert " 300 frames" in out and "decoded 64 of them for the sheet" in out
    sheet = np.asarray(Image.open(tmp_path / "b.png"))
    columns = sheet.shape[1] // 240
    assert columns * ((sheet.shape[0] + 1) // (135 + 16)) >= 64 and sheet.shape[0] < 12 * (135 + 16)


def test_prefetch_runs_ahead_keeps_order_and_raises_errors_where_they_happen():
    produced = threading.Event()

    def items():
        yield 0
        yield 1
        produced.set()
        yield 2
        raise ValueError("corrupt chunk")

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    assert produced.wait(timeout=5)  # item 1 was produced while the consumer still held item 0
    assert next(stream) == 1 and next(stream) == 2
    with pytest.raises(ValueError, match="corrupt chunk"):
        next(stream)


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    closed = threading.Event()

    def items():
        try:
            yield from range(10_000)
        finally:
            closed.set()

    stream = prefetch(items(), depth=1)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(timeout=5)
    assert not any(t.name == "visionzip-decode" and t.is_alive() for t in threading.enumerate())


def test_out_of_memory_halves_the_batch_and_gives_the_same_tokens(tiny_model_dir, clip_factory, caplog):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    path = clip_factory("oom.mp4", frames=24)
    encoder = vlm.video_encoder()
    reference = compress_frames(encoder, VideoHandle(path, every=2).iter(chunk_size=8), dominant=6, contextual=2,
                                batch_size=8)
    real_encode = encoder.encode
    sizes = []

    def tight(frames, **kwargs):  # this "device" holds at most 2 frames
        sizes.append(frames.shape[0])
        if frames.shape[0] > 2:
            raise MemoryError
        return real_encode(frames, **kwargs)

    encoder.encode = tight  # this one instance only, for this test
    try:
        with caplog.at_level(logging.WARNING):
            result = compress_frames(encoder, VideoHandle(path, every=2).iter(chunk_size=8), dominant=6, contextual=2,
                                     batch_size=8)
    finally:
        del encoder.encode
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2  # halved twice, then kept small
    assert "retrying with batches of 4 frames" in caplog.text and "batches of 2 frames" in caplog.text
    assert result.indices == reference.indices
    torch.testing.assert_close(result.tokens, reference.tokens)

    def never(frames, **kwargs):
        raise MemoryError

    encoder.encode = never
    try:
        with pytest.raises(ValueError, match="out of memory encoding a single frame"):
            compress_frames(encoder, VideoHandle(path, num_frames=2).iter(chunk_size=2), dominant=6, contextual=2,
                            batch_size=2)
    finally:
        del encoder.encode


@pytest.mark.parametrize("total", [None, 3, 12, 40])
def test_tokens_are_collected_in_place_whatever_the_stated_total(total, tiny_model_dir, clip_factory):
    vlm = load_vlm(tiny_model_dir("llava_next"), device="cpu")  # anyres: several maps rows per frame
    path = clip_factory("acc.mp4", frames=12, size=(96, 64))
    encoder = vlm.video_encoder()
    reference = compress_frames(encoder, [sample_video(path)], dominant=6, contextual=2, batch_size=12)
    result = compress_frames(encoder, VideoHandle(path).iter(chunk_size=5), dominant=6, contextual=2, batch_size=5,
                             total=total)
    assert result.indices == list(range(12)) and result.num_frames == 12
    torch.testing.assert_close(result.tokens, reference.tokens)
    assert torch.equal(result.assignment, reference.assignment) and result.scores.shape == reference.scores.shape


def test_cancel_stops_within_one_batch_and_the_decode_thread_ends(tiny_model_dir, clip_factory):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    path = clip_factory("cancel.mp4", frames=120, options={"g": "10"})

    class Cancelled(Exception):
        pass

    seen = []

    def progress(done, total):
        seen.append(done)
        raise Cancelled

    with pytest.raises(Cancelled):
        compress_video(vlm, path, every=1, batch_size=4, progress=progress)
    assert seen == [4]  # stopped after the first batch of 4 of the 120 frames
    for thread in threading.enumerate():
        if thread.name == "visionzip-decode":
            thread.join(timeout=5)
            assert not thread.is_alive()
