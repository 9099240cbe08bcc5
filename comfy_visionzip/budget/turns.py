"""Fitting each chat turn before it is prefilled: a first question whose compressed video does not fit is
thinned evenly (or refused), a follow-up that does not fit is refused (:func:`fit_turn`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import VisionZipError
from ..models.base import PromptVideo, VisionLanguageModel
from ..projection import frame_placeholders, video_layout
from ..prompt import Message, PromptBuilder
from ..temporal import thin
from ..tokens import CompressedVideo
from ..video import uniform_pick
from ..words import counted, part_of
from .counts import fit_frames

log = logging.getLogger(__name__)


@dataclass
class TurnFit:
    """What :func:`fit_turn` decided for one turn of a chat."""

    video: CompressedVideo  # the video the turn runs with (thinned, or the same)
    note: str = ""  # what was changed, and why (empty: nothing)

    @property
    def thinned(self) -> bool:
        return bool(self.note)


def compressed_prompt(vlm: VisionLanguageModel, video: CompressedVideo) -> PromptVideo:
    """What the prompt says of a compressed video (its encoded frames, placeholders, times)."""
    counts = frame_placeholders(vlm, video)
    layout = video_layout(vlm, video)
    visual = sum(counts) + layout.extra if counts else layout.total(video.num_frames)
    return PromptVideo(video.num_frames, visual, tuple(video.timestamps), video.meta.get("duration"), counts)


def fit_turn(vlm: VisionLanguageModel, builder: PromptBuilder, video: CompressedVideo, messages: list[Message],
             prompt_tokens: int, *, first: bool, answer_tokens: int, reserve: int, context: int,
             policy: str) -> TurnFit:
    """Check that a chat turn's prompt (``prompt_tokens`` long) + its answer (+ ``reserve`` for follow-ups,
    on the first turn) fit ``context``; thin the video evenly to fit a first question (policy "fit") or
    refuse with the numbers ("strict", and any follow-up: its video is already in the cache)."""
    keep = answer_tokens + (reserve if first else 0)
    need = prompt_tokens + keep
    if need <= context:
        return TurnFit(video)
    if not first:
        raise VisionZipError(
            f"this follow-up does not fit the context: the conversation is {prompt_tokens} tokens and the answer may "
            f"take {answer_tokens} more ({need} > {context}); lower max_new_tokens, or start a new chat with fewer "
            "frames or tokens per frame (or more room reserved for follow-ups)")
    frames = video.num_frames
    per_frame = video_layout(vlm, video).per_frame

    def count(n: int) -> int:
        return builder.count(compressed_prompt(vlm, thin(video, uniform_pick(frames, n))), messages) + keep

    fitted = fit_frames(count, context, frames)
    unit = video.frames_per_unit
    room = f" and {reserve} for follow-ups" if reserve else ""
    shown = f"{video.frames_text()} x {counted(per_frame, 'token')}"
    if video.repeats is not None:  # the temporal stage: frames differ
        shown = f"{video.frames_text()} ({counted(video.total_tokens, 'visual token')} after the temporal stage)"
    numbers_ = (f"{shown} make a prompt of {prompt_tokens} tokens, plus "
                f"{answer_tokens} for the answer{room} = {need} > the context of {context}")
    if policy == "strict" or fitted == 0:
        most = f"at most {counted(fitted * unit, 'frame')}" + (
            f" ({counted(fitted, 'temporal patch')})" if unit > 1 else "")
        fix = (f"use {most}, fewer tokens per frame, or policy 'fit'" if fitted
               else "fewer tokens per frame, a shorter question or a smaller max_new_tokens")
        raise VisionZipError(f"the video does not fit: {numbers_}; {fix}")
    thinned = thin(video, uniform_pick(frames, fitted))
    prompt = count(fitted) - keep
    kept = part_of(fitted, frames, thinned.sampled_frames, video.sampled_frames, unit)
    note = (f"fitted to the context: {numbers_}; kept {kept}, evenly spread: "
            f"prompt {prompt} + answer {answer_tokens}{f' + follow-ups {reserve}' if reserve else ''} <= {context}")
    log.warning("%s", note)
    return TurnFit(thinned, note)
