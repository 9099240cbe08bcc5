"""Faster decoding that stays honest: frames no planned frame needs are skipped, keyframe sampling (opt-in) serves
a planned frame with a nearby keyframe under its own true index and time, and decode worker processes give the
same frames in the same order, stop at once on Cancel and lose nothing when one dies."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from test_video import FORMATS, PLANS

from comfy_visionzip import VideoError, VideoHandle, VisionZipError, iter_video, sample_video
from comfy_visionzip.testing.synthetic import read_frame_number
from comfy_visionzip.video import get_index, workers
from comfy_visionzip.video.decode import PlannedReader
from comfy_visionzip.video.plan import snap_to_keyframes
from comfy_visionzip.video.probe import open_container

B_FRAMES = dict(options={"x264-params": "open-gop=1:keyint=30:bframes=3:b-pyramid=normal"})


def _numbers(clip) -> list[int]:
    return [read_frame_number(f.numpy()) for f in clip.frames]


def _reader(path: str, skip: bool) -> PlannedReader:
    index = get_index(path)
    return PlannedReader(lambda: open_container(path), index.stream_index, index.pts, index.keyframes,
                         index.has_pts, index.rotation, None, skip=skip)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decode_workers_give_every_format_frame_exactly_in_order(clip_factory, fmt):
    spec = dict(FORMATS[fmt])
    path = clip_factory(spec.pop("name"), frames=60, **spec)
    for plan in PLANS:
        alone = sample_video(path, workers=1, **plan)
        clip = sample_video(path, workers=3, **plan)
        assert clip.indices == alone.indices and _numbers(clip) == clip.indices, (fmt, plan)
        assert clip.timestamps == alone.timestamps


@pytest.mark.parametrize("plan", [list(range(0, 120, 7)), list(range(0, 120, 2)), [5, 50, 100], list(range(120))])
def test_skipping_drops_unneeded_frames_and_keeps_every_planned_one(clip_factory, plan):
    path = clip_factory("skip.mkv", frames=120, **B_FRAMES)
    seen = {}
    for skip in (False, True):
        reader = _reader(path, skip)
        got = [(p, read_frame_number(rgb)) for p, rgb in reader.read(plan)]
        reader.close()
        assert [p for p, _ in got] == plan and all(p == n for p, n in got), (skip, got)
        seen[skip] = reader.decoded
    if len(plan) < 120:  # non-reference B-frames that no planned frame needs were never decoded
        assert seen[True] < seen[False]


def test_a_keyframe_alone_is_decoded_from_one_packet(clip_factory):
    path = clip_factory("skip.mkv", frames=120, **B_FRAMES)
    reader = _reader(path, skip=True)
    keys = [int(k) for k in get_index(path).keyframes]
    assert [p for p, _ in reader.read(keys)] == keys
    reader.close()
    assert reader.fed == len(keys)  # the decoder was drained after each keyframe: nothing after it was read


def test_keyframe_snapping_rule():
    times = [i / 30 for i in range(18000)]  # 10 minutes at 30 fps, a keyframe every 250 frames
    keys = list(range(0, 18000, 250))
    plan = [round(k * 17999 / 63) for k in range(64)]
    moves = snap_to_keyframes(times, keys, plan)
    served = sorted(moves.get(p, p) for p in plan)
    assert len(set(served)) == 64 and served == sorted(served)
    half = (times[plan[1]] - times[plan[0]]) / 2
    assert all(abs(times[k] - times[p]) <= half for p, k in moves.items())
    # every frame but the last lands on a keyframe (the last has none within half a step)
    assert [p for p in plan if moves.get(p, p) not in keys] == [17999]
    # a dense plan (1 fps) keeps nearly every frame exact: keyframes are rarely within half a second
    dense = list(range(0, 18000, 30))
    assert len(snap_to_keyframes(times, keys, dense)) <= len(keys)
    assert all(abs(times[k] - times[p]) <= 0.5 for p, k in snap_to_keyframes(times, keys, dense).items())
    # inside the asked range only
    assert all(times[k] >= 100 for k in snap_to_keyframes(times, keys, [3001, 3600], start=100.0).values())


def test_keyframe_seek_returns_the_keyframes_with_their_own_index_and_time(clip_factory):
    path = clip_factory("sparse.mp4", frames=600, size=(96, 64), options={"g": "50", "bf": "2"})
    exact = sample_video(path, num_frames=9)
    clip = sample_video(path, num_frames=9, seek="keyframe")
    index = get_index(path)
    keys = set(int(k) for k in index.keyframes)
    assert _numbers(clip) == clip.indices  # the frame shown is the frame named
    assert clip.timestamps == [float(index.timestamps[i]) for i in clip.indices]
    assert sum(i in keys for i in clip.indices) == 8 and clip.indices[-1] == exact.indices[-1] == 599
    step = exact.timestamps[1] - exact.timestamps[0]
    assert all(abs(a - b) <= step / 2 + 1e-6 for a, b in zip(clip.timestamps, exact.timestamps))
    handle = VideoHandle(path, num_frames=9, seek="keyframe")
    assert handle.plan()[0] == clip.indices
    assert handle.seek_note().startswith("seek keyframe: 5 of 9 frames served by a nearby keyframe (moved at most")
    assert VideoHandle(path, num_frames=9).seek_note() == ""
    assert VideoHandle(path, every=50, seek="keyframe").seek_note() == \
        "seek keyframe: no frame moved (all 12 frames on keyframes already)"
    with pytest.raises(VisionZipError, match="seek must be 'exact'"):
        sample_video(path, num_frames=9, seek="fast")


def test_cancel_stops_the_decode_workers_at_once(clip_factory, monkeypatch):
    path = clip_factory("long.mkv", frames=300, **B_FRAMES)
    started: list = []
    real = workers._Worker

    def recording(*args, **kwargs):
        worker = real(*args, **kwargs)
        started.append(worker)
        return worker

    monkeypatch.setattr(workers, "_Worker", recording)

    def cancel(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _chunk in iter_video(path, every=1, workers=2, chunk_size=4, progress=cancel):
            pass
    assert len(started) == 2 and all(w.process.poll() is not None for w in started)


def test_a_worker_that_dies_loses_no_frame(clip_factory, monkeypatch, caplog):
    path = clip_factory("long.mkv", frames=300, **B_FRAMES)
    dies = ("import sys, os; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; import runpy\n"
            "g = runpy.run_path(sys.argv[1], run_name='w'); R = g['PlannedReader']; read = R.read\n"
            "def dying(self, frames):\n"
            "    for i, x in enumerate(read(self, frames)):\n"
            "        if i == 3: os._exit(3)\n"
            "        yield x\n"
            "R.read = dying; g['worker_main']()")
    monkeypatch.setattr(workers, "BOOT", dies)
    with caplog.at_level(logging.WARNING, logger="comfy_visionzip.video"):
        clip = sample_video(path, every=1, workers=2)
    assert clip.indices == list(range(300)) == _numbers(clip)
    assert "a decode worker stopped (exit code 3); decoding the rest in this process" in caplog.text


def test_a_file_gone_while_workers_read_it_is_one_clear_error(clip_factory, tmp_path):
    source = clip_factory("long.mkv", frames=300, **B_FRAMES)
    path = tmp_path / "going.mkv"
    path.write_bytes(open(source, "rb").read())
    chunks = iter_video(str(path), every=1, workers=2)  # indexed and planned here
    os.remove(path)
    with pytest.raises(VideoError, match="going.mkv.*file not found") as caught:
        list(chunks)
    assert "\n" not in str(caught.value) and str(tmp_path) not in str(caught.value).split(":", 1)[1]


def test_how_many_workers_a_plan_gets(clip_factory, monkeypatch):
    path = clip_factory("long.mkv", frames=300, **B_FRAMES)
    index = get_index(path)
    monkeypatch.setattr(workers, "available_cores", lambda: 4)
    assert workers.choose_workers(index, list(range(300)), None) == 1  # 300 small frames: not worth starting them
    monkeypatch.setattr(workers, "MIN_PARALLEL_FRAMES", 1)
    assert workers.choose_workers(index, list(range(300)), None) == 4
    assert workers.choose_workers(index, [3, 4], None) == 1  # one span
    assert workers.choose_workers(index, list(range(300)), 2) == 2
    with open(path, "rb") as f:  # a file object is read here
        assert workers.choose_workers(get_index(f), list(range(300)), 2) == 1
    parts = workers.spans(index, list(range(0, 300, 3)))
    assert [t for span in parts for t in span] == list(range(0, 300, 3))
    for a, b in zip(parts, parts[1:]):  # cut only where a keyframe separates the spans: nothing decoded twice
        assert index.keyframe_at_or_before(b[0]) > a[-1]
    with pytest.raises(VisionZipError, match="workers must be an integer from 1 to 64"):
        sample_video(path, num_frames=3, workers=0)
    assert np.array_equal(sample_video(path, num_frames=3, workers=None).frames,
                          sample_video(path, num_frames=3, workers=1).frames)


def test_the_plan_line_says_how_many_frames_a_keyframe_serves(clip_factory, tiny_model_dir, capsys):
    from comfy_visionzip import compress_video, load_vlm, plan_budget
    from comfy_visionzip.__main__ import main

    path = clip_factory("sparse.mp4", frames=600, size=(96, 64), options={"g": "50", "bf": "2"})
    assert main(["frames", path, "--frames", "9", "--seek", "keyframe", "--decode-workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "indices [0, 50, 150, 200, 300, 350, 450, 500, 599]" in out
    assert "seek keyframe: 5 of 9 frames served by a nearby keyframe (moved at most 0.83 s" in out
    vlm = load_vlm(tiny_model_dir("llava"), dtype="float32")
    plan = plan_budget(vlm, path, "What happens?", num_frames=9, seek="keyframe")
    assert plan.indices == [0, 50, 150, 200, 300, 350, 450, 500, 599]
    assert "seek keyframe: 5 of 9 frames served" in plan.summary()
    assert "seek keyframe" not in plan_budget(vlm, path, "What happens?", num_frames=9).summary()
    video = compress_video(vlm, plan.video, dominant=7, contextual=1)
    assert video.indices == plan.indices and video.summary().endswith(
        "; seek keyframe: 5 of 9 frames served by a nearby keyframe (moved at most 0.83 s; times are the keyframes' "
        "own)")


def test_no_worker_can_start_so_the_frames_are_decoded_here(clip_factory, monkeypatch, caplog):
    path = clip_factory("long.mkv", frames=300, **B_FRAMES)

    def refuse(*args, **kwargs):
        raise PermissionError("no processes here")

    monkeypatch.setattr(workers.subprocess, "Popen", refuse)
    with caplog.at_level(logging.WARNING, logger="comfy_visionzip.video"):
        clip = sample_video(path, every=2, workers=2)
    assert clip.indices == list(range(0, 300, 2)) == _numbers(clip)
    assert "decode workers cannot start (PermissionError); decoding in this process" in caplog.text
