"""Token budget planning: how many frames fit in a context window."""

from __future__ import annotations

import numbers

from .errors import VisionZipError


def frames_for_budget(token_budget: int, tokens_per_frame: int, *, reserved: int = 0, max_frames: int | None = None) -> int:
    """How many frames of ``tokens_per_frame`` visual tokens fit in ``token_budget`` tokens.

    ``reserved`` tokens are kept free for the prompt and the answer. E.g. a budget of 2048 with
    VisionZip's 17 tokens per frame (Video-LLaVA setting) fits 120 frames; uncompressed (257) only 7.

    Raises:
        VisionZipError: non-positive numbers, or a budget that cannot hold a single frame.
    """
    for name, value, low in (("token_budget", token_budget, 1), ("tokens_per_frame", tokens_per_frame, 1),
                             ("reserved", reserved, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise VisionZipError(f"{name} must be an integer >= {low}, got {value!r}")
    usable = int(token_budget) - int(reserved)
    frames = usable // int(tokens_per_frame)
    if frames < 1:
        raise VisionZipError(
            f"a budget of {token_budget} tokens ({reserved} reserved) cannot hold one frame of {tokens_per_frame} "
            "tokens; raise the budget or compress harder (fewer tokens per frame)"
        )
    if max_frames is not None:
        if isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral) or max_frames < 1:
            raise VisionZipError(f"max_frames must be a positive integer or None, got {max_frames!r}")
        frames = min(frames, int(max_frames))
    return frames
