"""Frame plans: which source frames to decode. Pure functions, no decoder involved.

A plan is a sorted list of unique frame indices (frame ``i`` = the i-th frame of the stream in
presentation order). Plans depend only on the stream's frame count, its fps and, for variable frame
rate video, the presentation time of every frame, so they are tested without any video file.

Modes (at most one of ``num_frames`` / ``fps`` / ``every``; none means every frame):
  - ``num_frames=N``: N frames spread uniformly over [start, end), first and last frame included.
  - ``fps=f``: one frame per 1/f seconds (the frame nearest each tick), never more than the source has.
  - ``every=n``: every n-th frame, starting with the first frame in range.
``max_frames`` then caps the plan by thinning it uniformly (so a capped plan still spans the whole
range instead of stopping early).
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence

from ..errors import VisionZipError
from ..words import counted


def _check_positive_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise VisionZipError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise VisionZipError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def uniform_pick(count: int, n: int) -> list[int]:
    """``n`` positions spread uniformly over ``range(count)``, first and last included, unique.

    ``n >= count`` returns every position; ``n == 1`` returns the middle one.
    """
    if count <= 0:
        return []
    if n >= count:
        return list(range(count))
    if n == 1:
        return [(count - 1) // 2]
    step = (count - 1) / (n - 1)  # >= 1, so rounding never repeats a position
    return [int(math.floor(k * step + 0.5)) for k in range(n)]


def check_plan_args(
    *,
    num_frames: object = None,
    target_fps: object = None,
    every: object = None,
    start: object = 0.0,
    end: object = None,
    max_frames: object = None,
) -> tuple[int | None, float | None, int | None, float, float | None, int | None]:
    """Validate the sampling options (before any file is opened); returns them normalised.

    Returns ``(num_frames, target_fps, every, start, end, max_frames)``.
    """
    frames_n = _check_positive_int("num_frames", num_frames)
    every_n = _check_positive_int("every", every)
    max_n = _check_positive_int("max_frames", max_frames)
    start_s = _check_seconds("start", start)
    end_s = None if end is None else _check_seconds("end", end)
    rate: float | None = None
    if target_fps is not None:
        if isinstance(target_fps, bool) or not isinstance(target_fps, numbers.Real) or not (
            0 < float(target_fps) < math.inf
        ):
            raise VisionZipError(f"fps must be a positive number of frames per second or None, got {target_fps!r}")
        rate = float(target_fps)
    modes = [name for name, v in (("num_frames", frames_n), ("fps", rate), ("every", every_n)) if v is not None]
    if len(modes) > 1:
        raise VisionZipError(f"give at most one of num_frames, fps, every (got {', '.join(modes)})")
    if end_s is not None and end_s <= start_s:
        raise VisionZipError(f"end ({end_s:g} s) must be after start ({start_s:g} s)")
    return frames_n, rate, every_n, start_s, end_s, max_n


def plan_frames(
    frame_count: int,
    fps: float,
    *,
    timestamps: Sequence[float] | None = None,
    num_frames: int | None = None,
    target_fps: float | None = None,
    every: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
) -> list[int]:
    """Return the sorted, unique frame indices to decode.

    Args:
        frame_count: number of frames in the stream (> 0).
        fps: the stream's average frame rate, used for times when ``timestamps`` is None.
        timestamps: presentation time in seconds of every frame (len == frame_count, ascending),
            relative to the first frame; pass it for variable frame rate video.
        num_frames / target_fps / every / max_frames: see the module docstring.
        start, end: the time range in seconds, ``start <= t < end`` (``end=None``: to the end).

    Raises:
        VisionZipError: nonsense parameters, or a range that holds no frame.
    """
    num_frames, target_fps, every, start, end, max_frames = check_plan_args(
        num_frames=num_frames, target_fps=target_fps, every=every, start=start, end=end, max_frames=max_frames
    )
    if not isinstance(frame_count, int) or frame_count <= 0:
        raise VisionZipError(f"the video has no frames to plan from (frame count {frame_count!r})")
    if timestamps is None:
        if not (fps and math.isfinite(fps) and fps > 0):
            raise VisionZipError(f"fps must be positive to plan without timestamps, got {fps!r}")
        times: Sequence[float] = [i / fps for i in range(frame_count)]
    else:
        if len(timestamps) != frame_count:
            raise VisionZipError(f"{counted(len(timestamps), 'timestamp')} given for {counted(frame_count, 'frame')}")
        times = timestamps

    # Frames whose presentation time lies in [start, end).
    first = bisect.bisect_left(times, start - 1e-6)
    last = frame_count if end is None else bisect.bisect_left(times, end - 1e-6)
    if first >= last:
        length = times[-1] + (1.0 / fps if fps and fps > 0 else 0.0)
        span = f"{start:g} s to {'the end' if end is None else f'{end:g} s'}"
        raise VisionZipError(f"no frame lies between {span}; the video is {length:.3f} s long")
    count = last - first

    if num_frames is not None:
        picks = [first + p for p in uniform_pick(count, num_frames)]
    elif every is not None:
        picks = list(range(first, last, every))
    elif target_fps is not None:
        picks = _nearest_to_ticks(times, first, last, 1.0 / target_fps)
    else:
        picks = list(range(first, last))

    if max_frames is not None and len(picks) > max_frames:
        picks = [picks[p] for p in uniform_pick(len(picks), max_frames)]
    return picks


def _nearest_to_ticks(times: Sequence[float], first: int, last: int, period: float) -> list[int]:
    """For ticks t0, t0+period, ... before times[last-1], the index of the frame nearest each tick."""
    t0 = times[first]
    t_end = times[last - 1]
    if (t_end - t0) / period + 1 > 4 * (last - first):
        return list(range(first, last))  # asks for (much) more than the source has: every frame
    picks: list[int] = []
    k = 0
    while True:
        tick = t0 + k * period
        if tick > t_end + 1e-9:
            break
        j = bisect.bisect_left(times, tick, first, last)
        if j >= last:
            j = last - 1
        elif j > first and tick - times[j - 1] <= times[j] - tick:
            j -= 1  # the earlier frame is nearer (ties go to the earlier frame)
        if not picks or picks[-1] != j:
            picks.append(j)
        k += 1
    return picks


SEEKS = ("exact", "keyframe")


def check_seek(seek: object) -> str:
    if seek not in SEEKS:
        raise VisionZipError(f"seek must be 'exact' (every planned frame decoded exactly) or 'keyframe' (a keyframe "
                             f"near a planned frame serves it), got {seek!r}")
    return str(seek)


def snap_to_keyframes(times: Sequence[float], keyframes: Sequence[int], planned: Sequence[int],
                      start: float = 0.0, end: float | None = None) -> dict[int, int]:
    """Which planned frames a keyframe serves: ``{planned frame: keyframe}``.

    A planned frame is served by its nearest keyframe when that keyframe lies within half the sampling interval
    around it (half the distance to the nearer of its planned neighbours; for a one-frame plan, half the range),
    inside [start, end), and is not planned or serving another frame already. So snapped frames keep their order
    and stay distinct, each moves by less than half a step of the plan, and a keyframe's decode (one frame, no
    GOP before it) replaces the decode of everything from the keyframe before the planned frame up to it.
    """
    plan = sorted(planned)
    if not plan or len(keyframes) == 0:
        return {}
    keys = sorted(int(k) for k in keyframes)
    key_times = [float(times[k]) for k in keys]
    stop = math.inf if end is None else end
    taken = set(plan)
    out: dict[int, int] = {}
    for i, frame in enumerate(plan):
        t = float(times[frame])
        gaps = [t - float(times[plan[i - 1]])] if i > 0 else []
        gaps += [float(times[plan[i + 1]]) - t] if i + 1 < len(plan) else []
        half = min(gaps) / 2 if gaps else (min(stop, float(times[-1])) - start) / 2
        j = bisect.bisect_left(key_times, t)
        near = sorted((abs(key_times[c] - t), keys[c]) for c in (j - 1, j) if 0 <= c < len(keys))
        for shift, key in near:
            if key == frame:
                break  # already a keyframe
            if shift > half or not start <= float(times[key]) < stop or key in taken:
                continue
            out[frame] = key
            taken.add(key)
            break
    return out
