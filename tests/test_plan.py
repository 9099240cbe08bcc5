"""Frame plans are pure functions of (frame count, fps, timestamps): tested without any decoder."""

import pytest

from comfy_visionzip import VisionZipError, frames_for_budget, plan_frames
from comfy_visionzip.video import uniform_pick


def test_uniform_includes_ends_and_is_unique():
    assert plan_frames(300, 30.0, num_frames=4) == [0, 100, 199, 299]
    assert plan_frames(10, 30.0, num_frames=10) == list(range(10))
    for n in range(1, 50):
        picks = plan_frames(49, 25.0, num_frames=n)
        assert len(picks) == n and picks == sorted(set(picks))
        assert n == 1 or (picks[0] == 0 and picks[-1] == 48)


def test_single_frame_is_the_middle():
    assert plan_frames(101, 30.0, num_frames=1) == [50]


def test_more_frames_than_exist_returns_every_frame_once():
    assert plan_frames(5, 30.0, num_frames=100) == [0, 1, 2, 3, 4]


def test_time_range_is_half_open():
    # 30 fps: frame i at i/30 s. [1 s, 2 s) holds frames 30..59.
    assert plan_frames(300, 30.0, start=1.0, end=2.0) == list(range(30, 60))
    assert plan_frames(300, 30.0, num_frames=3, start=1.0, end=2.0) == [30, 45, 59]
    assert plan_frames(300, 30.0, every=10, start=9.5) == [285, 295]


def test_target_fps_takes_the_nearest_frame_to_each_tick():
    assert plan_frames(300, 30.0, target_fps=1.0) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    # 29.97 fps: the frame nearest each whole second
    picks = plan_frames(300, 30000 / 1001, target_fps=1.0)
    assert picks[:4] == [0, 30, 60, 90] and len(picks) == 10
    # asking for more than the source has gives each frame once
    assert plan_frames(30, 30.0, target_fps=1000.0) == list(range(30))
    assert plan_frames(30, 30.0, target_fps=60.0) == list(range(30))


def test_variable_frame_rate_uses_timestamps():
    # 10 frames 0.1 s apart, then 10 frames 1 s apart.
    times = [k * 0.1 for k in range(10)] + [1.0 + k for k in range(10)]
    assert plan_frames(20, 2.0, timestamps=times, target_fps=1.0) == [0, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert plan_frames(20, 2.0, timestamps=times, start=0.5, end=3.5) == [5, 6, 7, 8, 9, 10, 11, 12]


def test_every_nth_and_cap_thins_uniformly_over_the_range():
    assert plan_frames(100, 30.0, every=25) == [0, 25, 50, 75]
    # a 1-hour video at 1 fps capped at 8 frames still spans the hour
    picks = plan_frames(108000, 30.0, target_fps=1.0, max_frames=8)
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] >= 107000
    assert plan_frames(1000, 30.0, max_frames=3) == [0, 500, 999]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"num_frames": -3}, "num_frames must be a positive integer"),
        ({"num_frames": 2.5}, "num_frames must be a positive integer"),
        ({"every": 0}, "every must be a positive integer"),
        ({"target_fps": 0}, "fps must be a positive number"),
        ({"target_fps": float("nan")}, "fps must be a positive number"),
        ({"start": -1}, "start must be a finite number"),
        ({"start": 5.0, "end": 2.0}, "end (2 s) must be after start (5 s)"),
        ({"start": 2.0, "end": 2.0}, "must be after start"),
        ({"num_frames": 4, "every": 2}, "at most one of num_frames, fps, every"),
        ({"max_frames": 0}, "max_frames must be a positive integer"),
        ({"start": 20.0}, "no frame lies between 20 s to the end; the video is 10.000 s long"),
    ],
)
def test_nonsense_parameters_are_clear_errors(kwargs, message):
    with pytest.raises(VisionZipError) as err:
        plan_frames(300, 30.0, **kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_uniform_pick_edge_cases():
    assert uniform_pick(0, 5) == []
    assert uniform_pick(7, 2) == [0, 6]


def test_frames_for_budget():
    assert frames_for_budget(2048, 17) == 120
    assert frames_for_budget(2048, 257) == 7
    assert frames_for_budget(2048, 17, reserved=248) == 105
    assert frames_for_budget(2048, 17, max_frames=32) == 32
    with pytest.raises(VisionZipError, match="cannot hold one frame"):
        frames_for_budget(100, 257)
    with pytest.raises(VisionZipError, match="tokens_per_frame must be an integer >= 1"):
        frames_for_budget(2048, 0)
