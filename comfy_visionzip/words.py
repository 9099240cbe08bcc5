"""How the library's messages say counts: "1 frame" and "2 frames", and frames against what a model
encodes them as (one image per frame; Qwen: a temporal patch of two frames, an odd last frame repeated).

Summaries, plans and notes all say counts through these, so that a number is always of the thing its
word names and the parts of a line add up to its total.
"""

from __future__ import annotations


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """``count`` and the word in the number it needs: "1 frame", "0 frames", "3 temporal patches"."""
    if count == 1:
        return f"{count} {singular}"
    if plural is None:
        plural = singular + ("es" if singular.endswith(("ch", "sh", "s", "x")) else "s")
    return f"{count} {plural}"


def unit_name(frames_per_unit: int, *, plural: bool = False) -> str:
    """What one encoded image of a video is: a frame, or a temporal patch of several frames."""
    if frames_per_unit <= 1:
        return "frames" if plural else "frame"
    return "temporal patches" if plural else "temporal patch"


def units_of(frames: int, frames_per_unit: int) -> int:
    """Encoded images (temporal patches) that ``frames`` sampled frames make (an odd last one is repeated)."""
    return -(-frames // max(frames_per_unit, 1))


def frames_as_units(frames: int, frames_per_unit: int, where: str = "") -> str:
    """``frames`` sampled frames (``where`` from, e.g. " of clip.mp4") as the model encodes them: "7 frames"
    (one image each), or "7 frames = 4 temporal patches of 2 frames (the last frame repeated)"."""
    shown = counted(frames, "frame") + where
    if frames_per_unit <= 1:
        return shown
    units = units_of(frames, frames_per_unit)
    repeated = units * frames_per_unit - frames
    again = "" if not repeated else " (the last frame repeated)" if repeated == 1 else \
        f" (the last frame repeated {repeated} times)"
    return f"{shown} = {counted(units, 'temporal patch')} of {frames_per_unit} frames{again}"


def part_of(kept: int, units: int, kept_frames: int, frames: int, frames_per_unit: int) -> str:
    """A thinning in words: "5 of 30 frames", or "5 of 15 temporal patches (10 of 29 frames)"."""
    if frames_per_unit <= 1:
        return f"{kept} of {counted(units, 'frame')}"
    return f"{kept} of {counted(units, 'temporal patch')} ({kept_frames} of {counted(frames, 'frame')})"


__all__ = ["counted", "frames_as_units", "part_of", "unit_name", "units_of"]
