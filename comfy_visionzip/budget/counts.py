"""The numbers the planner works with: the model's context, a run's budget in it, and how many frames of
a video fit a limit (an exact count searched over thinnings)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

from ..errors import VisionZipError
from ..models.base import PromptVideo, VisionLanguageModel, VisualLayout
from ..video import uniform_pick
from ..words import counted

POLICIES = ("fit", "strict")
# tokens per image tried by tokens_per_frame="auto", most first: the paper's LLaVA-1.5 settings, then below
TOKEN_LADDER = (192, 128, 64, 32, 16)


def check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise VisionZipError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def frames_for_budget(token_budget: int, tokens_per_frame: int, *, reserved: int = 0,
                      max_frames: int | None = None) -> int:
    """How many frames of ``tokens_per_frame`` visual tokens fit in ``token_budget`` tokens (arithmetic only).

    ``reserved`` tokens are kept free for the prompt and the answer. E.g. a budget of 2048 with
    VisionZip's 17 tokens per frame (Video-LLaVA setting) fits 120 frames; uncompressed (257) only 7.
    Without a model this cannot count the prompt's text; :func:`plan_budget` does, exactly.

    Raises:
        VisionZipError: non-positive numbers, or a budget that cannot hold a single frame.
    """
    check_int("token_budget", token_budget, 1)
    check_int("tokens_per_frame", tokens_per_frame, 1)
    check_int("reserved", reserved, 0)
    usable = int(token_budget) - int(reserved)
    frames = usable // int(tokens_per_frame)
    if frames < 1:
        raise VisionZipError(
            f"a budget of {counted(token_budget, 'token')} ({reserved} reserved) cannot hold one frame of "
            f"{counted(tokens_per_frame, 'token')}; raise the budget or compress harder (fewer tokens per frame)"
        )
    if max_frames is not None:
        if isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral) or max_frames < 1:
            raise VisionZipError(f"max_frames must be a positive integer or None, got {max_frames!r}")
        frames = min(frames, int(max_frames))
    return frames


def context_length(vlm: VisionLanguageModel) -> int:
    """The language model's context window in tokens, from the checkpoint's text config."""
    config = vlm.config
    text = config.get("text_config") or {}
    for source in (text, config):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    # the transformers config fills in its class defaults (a config.json may leave the length out)
    value = getattr(vlm.model.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        return value
    raise VisionZipError(f"{vlm.path}: its config states no context length "
                         "(text_config.max_position_embeddings); give the context explicitly")


def cap_budget(budget: int, context: int, policy: str) -> tuple[int, str | None]:
    """(the tokens a run may use, a note when capped): 0 means the context; more than the context is
    capped to it ("fit") or refused ("strict")."""
    if budget == 0:
        return context, None
    if budget <= context:
        return budget, None
    if policy == "strict":
        raise VisionZipError(f"a budget of {budget} tokens is more than the model's context of {context}; "
                             f"use at most {context} (or 0 for the context)")
    return context, f"budget {budget} capped at the context of {context}"


def thinned_prompt(frames: int, layout: VisualLayout, timestamps: Sequence[float],
                   duration: float | None) -> Callable[[int], PromptVideo]:
    """``video(n)``: what the prompt says of a video of ``frames`` frames thinned evenly to n of them."""
    unit = layout.frames_per_unit

    def video(n: int) -> PromptVideo:
        keep = uniform_pick(frames, n)
        times = [timestamps[k] for k in keep] if timestamps else []
        if unit > 1:  # encoded frames are temporal patches of `unit` frames: their mean time, the last one padded
            times = times + times[-1:] * ((-len(times)) % unit) if times else []
            times = [sum(times[i: i + unit]) / unit for i in range(0, len(times), unit)]
        return PromptVideo(layout.units(n), layout.total(n), tuple(times), duration)
    return video


def fit_frames(count: Callable[[int], int], limit: int, frames: int) -> int:
    """The largest n in 1..frames with ``count(n) <= limit`` (count grows with n); 0 if not even one fits."""
    if frames < 1 or count(1) > limit:
        return 0
    low, high = 1, frames  # count(low) fits
    while low < high:
        mid = (low + high + 1) // 2
        if count(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    return low
