"""Planning before anything is decoded: frames x tokens per frame so that the whole first prompt and the
reserves fit (:func:`plan_budget` -> :class:`BudgetPlan`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import VisionZipError
from ..models.base import PromptVideo, VisionLanguageModel, VisualLayout
from ..pipeline import video_source
from ..projection import visual_layout
from ..prompt import Message, PromptBuilder
from ..settings import Compression
from ..temporal import Temporal
from ..video import FramesHandle, VideoHandle, uniform_pick
from ..words import counted, frames_as_units, unit_name, units_of
from ..zip import split_tokens
from .counts import POLICIES, TOKEN_LADDER, cap_budget, check_int, context_length, fit_frames, thinned_prompt


@dataclass
class BudgetPlan:
    """What the planner chose, the exact counts behind it, and why (:meth:`summary`)."""

    video: VideoHandle | FramesHandle  # the handle to sample: the asked one, or thinned to the chosen frames
    frames: int  # frames chosen
    asked_frames: int  # frames the asked plan had
    indices: list[int]
    timestamps: list[float]
    compression: Compression  # what to compress with (the temporal stage held to the plan's room for visual tokens)
    per_frame: int  # visual tokens per frame in the prompt (crops and newlines included)
    visual_tokens: int  # placeholders in the first prompt
    prompt_tokens: int  # the first prompt, exactly what the first question prefills
    answer_tokens: int  # reserved for the answer (max_new_tokens)
    follow_up_tokens: int  # reserved for follow-up turns
    budget: int  # tokens the run may use (<= context)
    context: int  # the model's context window
    policy: str
    reasons: list[str] = field(default_factory=list)
    frames_per_unit: int = 1  # sampled frames per encoded frame (Qwen: a temporal patch of two)
    newlines: int = 0  # placeholders among visual_tokens that are newline tokens, not visual tokens
    per_image: int = 0  # visual tokens each image keeps (0: per_frame, when it was not given)
    crops: int = 1  # images per encoded frame (anyres: the whole frame + tiles)

    @property
    def method(self) -> str:
        return self.compression.method

    @property
    def dominant(self) -> int:
        return self.compression.dominant

    @property
    def contextual(self) -> int:
        return self.compression.contextual

    @property
    def temporal(self) -> Temporal | None:
        """The temporal stage's settings, when on (then visual_tokens is the most it may keep)."""
        return self.compression.temporal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.answer_tokens + self.follow_up_tokens

    @property
    def fitted(self) -> bool:
        return self.frames < self.asked_frames

    def summary(self) -> str:
        """One line whose parts add up: frames (for Qwen: the temporal patches they make) x tokens each =
        visual tokens (+ newline tokens), the prompt and the reserves of the budget, then why."""
        reserve = f" + answer {self.answer_tokens}"
        if self.follow_up_tokens:
            reserve += f" + follow-ups {self.follow_up_tokens}"
        unit = self.frames_per_unit
        units = units_of(self.frames, unit)
        frames = frames_as_units(self.frames, unit)
        per_image = self.per_image or self.per_frame
        each = f"{self.per_frame} {'token' if self.per_frame == 1 else 'tokens'} ({self._breakdown(per_image)})"
        visual = units * self.crops * per_image  # visual tokens before the temporal stage
        if self.temporal is not None:
            lines = f" + {counted(self.newlines, 'newline')}" if self.newlines else ""
            head = (f"{frames} x at most {each}, up to {counted(self.visual_tokens - self.newlines, 'visual token')}"
                    f"{lines} after the temporal stage; prompt at most {self.prompt_tokens}{reserve}")
        else:
            newlines = self.visual_tokens - visual
            each_lines = self.per_frame - self.crops * per_image
            lines = "" if not newlines else f" + {counted(newlines, 'closing newline')}" if not each_lines else \
                f" + {counted(newlines, 'newline')}"
            head = (f"{frames} x {each} = {counted(visual, 'visual token')}{lines}; "
                    f"prompt {self.prompt_tokens}{reserve}")
        head = (f"{head} = {self.total_tokens} of {self.budget} tokens"
                f"{' (the context)' if self.budget == self.context else f' (context {self.context})'}")
        return "; ".join([head, *self.reasons])

    def _breakdown(self, per_image: int) -> str:
        """What a frame's (or temporal patch's) tokens are: "54+10 per image", "5 images x 16 (14+2) + 1 newline",
        "pool", or all of a small Qwen frame's."""
        image = "image" if self.crops > 1 or self.frames_per_unit == 1 else unit_name(self.frames_per_unit)
        asked = self.dominant + self.contextual
        if self.method == "visionzip" and per_image < asked:  # Qwen's small frames keep every token
            split = f"every token: a {image} of this size has only {per_image}, fewer than the " \
                    f"{self.dominant}+{self.contextual} asked"
        elif self.method == "visionzip":
            split = f"{self.dominant}+{self.contextual}" + ("" if self.crops > 1 else f" per {image}")
        else:
            split = self.method
        lines = self.per_frame - self.crops * per_image
        if self.crops == 1 and not lines:
            return split
        shown = f"{self.crops} images x {per_image} ({split})" if self.crops > 1 else f"{per_image} ({split})"
        return shown + (f" + {counted(lines, 'newline')}" if lines else "")


def plan_budget(
    vlm: VisionLanguageModel,
    video: Any,
    question: str,
    *,
    budget: int = 0,
    policy: str = "fit",
    method: str = "visionzip",
    dominant: int = 54,
    contextual: int = 10,
    tokens_per_frame: int | str | None = None,
    max_new_tokens: int = 256,
    follow_ups: Sequence[str] = (),
    follow_up_tokens: int = 0,
    system: str | None = None,
    timestamps: bool = True,
    context: int | None = None,
    temporal: Temporal | float | int | str | bool | None = None,
    temporal_expand: float = 4.0,
    compression: Compression | None = None,
    **sample_kwargs: Any,
) -> BudgetPlan:
    """Choose frames x tokens per frame so that the whole first prompt plus the reserves fits.

    Args:
        vlm: the loaded model (its config, tokenizer, chat template and encoder are used; nothing runs
            on pixels).
        video: a :class:`~comfy_visionzip.video.VideoHandle` / ``FramesHandle``, or a path with
            ``sample_kwargs`` (num_frames, fps, every, start, end, max_frames, backend, ...). The
            asked plan is the handle's; with no plan at all, every frame is asked (and thinned).
        question: the first question (counted exactly).
        budget: tokens the run may use; 0 (default) means the model's context.
        policy: "fit" thins the asked frames evenly to fit; "strict" raises instead.
        method, dominant, contextual: the compression (as :func:`~comfy_visionzip.vlm.compress_video`).
        tokens_per_frame: an int splits into dominant + contextual with the paper's ratio; "auto" picks
            the largest of :data:`TOKEN_LADDER` at which every asked frame fits (then thins, if even
            the smallest does not).
        max_new_tokens: reserved for the answer.
        follow_ups: follow-up questions to keep room for (their text and an answer of max_new_tokens each);
            ``follow_up_tokens`` reserves a plain number of tokens besides.
        system, timestamps: as :class:`~comfy_visionzip.answer.Chat` will be given them.
        context: override the checkpoint's context length.
        temporal: the temporal stage (a threshold, True, or a :class:`~comfy_visionzip.temporal.Temporal`): static
            stretches cost less, so up to ``temporal_expand`` times the frames that fit without it are kept
            (never more than asked), and the room left for visual tokens becomes the stage's budget (on the
            returned plan's ``compression``): after encoding, its threshold is tightened until the kept tokens fit.
        compression: method, counts, tokens_per_frame "auto" and temporal at once (then leave those out).

    Raises:
        VisionZipError: nonsense numbers, a strict plan that does not fit (naming the counts and the
        largest plan that would), or a budget too small for a single frame.
    """
    if policy not in POLICIES:
        raise VisionZipError(f"unknown policy {policy!r}; valid: fit (thin the frames to fit), strict (refuse)")
    budget = check_int("budget", budget, 0)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    follow_up_tokens = check_int("follow_up_tokens", follow_up_tokens, 0)
    if not isinstance(question, str) or not question.strip():
        raise VisionZipError("the question is empty")
    settings = compression or Compression.parse(method=method, dominant=dominant, contextual=contextual,
                                                tokens_per_frame=tokens_per_frame, temporal=temporal)
    auto, temporal_on = settings.auto, settings.temporal
    method = settings.method
    context = check_int("context", context, 1) if context else context_length(vlm)
    budget, capped = cap_budget(budget, context, policy)
    reasons: list[str] = [capped] if capped else []
    source = video_source(vlm, video, **sample_kwargs)
    asked, asked_times = source.plan()
    duration = source.duration()
    frame_size = source.frame_size()
    builder = PromptBuilder(vlm, system=system, timestamps=timestamps)
    first = [{"role": "user", "text": question.strip()}]

    # follow-ups: each closes the previous answer and adds its question (counted with the template), + its answer
    follow_reserve = follow_up_tokens
    convo = list(first)
    probe = PromptVideo(1, 1, (0.0,), duration)
    for q in follow_ups:
        before = builder.count(probe, convo)
        convo = [*convo, {"role": "assistant", "text": ""}, {"role": "user", "text": str(q).strip()}]
        follow_reserve += builder.count(probe, convo) - before + max_new_tokens
    limit = budget - max_new_tokens - follow_reserve
    if limit < 1:
        raise VisionZipError(f"the budget of {counted(budget, 'token')} leaves no room for the video after reserving "
                             f"{max_new_tokens} for the answer and {follow_reserve} for follow-ups")

    def picks(n: int) -> list[int]:
        return [asked[p] for p in uniform_pick(len(asked), n)]

    if auto:  # the rungs an image of this tower can give (fewer than its own token count)
        most = vlm.video_encoder().tokens_per_image
        ladder = [split_tokens(t) for t in TOKEN_LADDER if t < most] or [split_tokens(min(TOKEN_LADDER[-1], most))]
    else:
        ladder = [(settings.dominant, settings.contextual)]
    for step, (d, c) in enumerate(ladder):
        layout = visual_layout(vlm, method=method, dominant=d, contextual=c, frame_size=frame_size)
        video_of = thinned_prompt(len(asked), layout, asked_times, duration)

        def count(n: int, video_of: Callable[[int], PromptVideo] = video_of) -> int:
            return builder.count(video_of(n), first)

        asked_count = count(len(asked))
        if asked_count <= limit or step == len(ladder) - 1:
            break
    settings = settings.with_counts(d, c)
    if auto:
        image = "image" if layout.crops > 1 else unit_name(layout.frames_per_unit)
        reasons.append(f"{layout.per_image} tokens per {image} ({d}+{c}): "
                       + ("the most of " + "/".join(map(str, TOKEN_LADDER)) + " at which every asked frame fits"
                          if asked_count <= limit else "the fewest tried, and still too many frames"))
    frames = len(asked)
    if asked_count > limit:
        fitted = fit_frames(count, limit, len(asked))
        numbers_ = (f"the asked {frames_as_units(len(asked), layout.frames_per_unit)} x "
                    f"{counted(layout.per_frame, 'token')} make a prompt of {asked_count} tokens; "
                    f"with {max_new_tokens} for the answer"
                    f"{f' and {follow_reserve} for follow-ups' if follow_reserve else ''} "
                    f"that is {asked_count + budget - limit} > {budget}")
        if fitted == 0:
            asked_text = len(vlm.tokenizer(question.strip(), add_special_tokens=False)["input_ids"])
            if asked_text * 2 > limit:  # the question itself is what does not fit
                raise VisionZipError(f"the question is {counted(asked_text, 'token')} long "
                                     f"({question.strip()[:40]!r}...), and the prompt may use {limit} after the "
                                     "reserves: shorten the question")
            raise VisionZipError(f"not even one frame fits: {numbers_}; raise the budget, use fewer tokens per frame "
                                 "or a smaller max_new_tokens")
        if policy == "strict":
            raise VisionZipError(f"the plan does not fit: {numbers_}; ask for at most {counted(fitted, 'frame')} "
                                 "(num_frames / max_frames), fewer tokens per frame, or policy 'fit'")
        frames = fitted
        reasons.append(f"fit: {numbers_}, so {fitted} of the {counted(len(asked), 'asked frame')} are kept, "
                       "evenly spread")
    visual_budget = None
    if temporal_on is not None:
        frames, visual_budget, why = _temporal_plan(builder, first, layout, asked, asked_times, duration, frames,
                                                    limit, temporal_expand)
        reasons.append(why)
    prompt_tokens = len(builder.ids(video_of(frames), first))  # exact, with every placeholder tokenised
    chosen = picks(frames)
    chosen_times = list(video_of(frames).timestamps)
    thinned = source if frames == len(asked) else source.pick(chosen)
    visual_tokens = layout.total(frames)
    note = source.seek_note(chosen) if isinstance(source, VideoHandle) else ""
    if note:
        reasons.append(note)
    if visual_budget is not None:  # the temporal stage: at most what is new, within the room
        settings = settings.with_temporal_budget(visual_budget)
        most = min(visual_tokens, visual_budget + layout.besides_tokens(frames))
        prompt_tokens, visual_tokens = prompt_tokens - visual_tokens + most, most
    return BudgetPlan(
        video=thinned, frames=frames, asked_frames=len(asked), indices=chosen, timestamps=chosen_times,
        compression=settings, per_frame=layout.per_frame, visual_tokens=visual_tokens,
        prompt_tokens=prompt_tokens, answer_tokens=max_new_tokens, follow_up_tokens=follow_reserve, budget=budget,
        context=context, policy=policy, reasons=reasons, frames_per_unit=layout.frames_per_unit,
        newlines=layout.besides_tokens(frames), per_image=layout.per_image, crops=layout.crops,
    )


def _temporal_plan(builder: PromptBuilder, first: list[Message], layout: VisualLayout, asked: list[int],
                   asked_times: list[float], duration: float | None, fitted: int, limit: int,
                   expand: float) -> tuple[int, int, str]:
    """(frames, budget of kept visual tokens, reason) with the temporal stage on."""
    frames = min(len(asked), max(fitted, math.ceil(fitted * float(expand))))
    while True:
        video = thinned_prompt(len(asked), layout, asked_times, duration)(frames)
        text = builder.count(video, first) - video.visual_tokens
        units = layout.units(frames)
        budget = limit - text - layout.besides_tokens(frames)
        if budget >= units or frames <= 1:  # every encoded frame keeps at least one token
            break
        frames = max(1, frames * 3 // 4)
    if budget < 1:
        raise VisionZipError("not even one frame fits with the temporal stage: "
                             "raise the budget or shorten the question")
    most = layout.units(frames) * layout.crops * layout.per_image
    room = (f"room for {budget} of their at most {most} tokens: the threshold is tightened after encoding if the "
            "new ones do not fit" if budget < most else f"room for all their {most} tokens (nothing to tighten)")
    why = (f"temporal: {frames} of the {counted(len(asked), 'asked frame')} kept ({fitted} fit without the stage; "
           f"up to {expand:g}x as many); tokens repeating an earlier frame are dropped; {room}")
    return frames, budget, why
