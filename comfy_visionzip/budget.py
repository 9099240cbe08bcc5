"""Token budget planning: what fits in the model's context, counted exactly, before anything is decoded.

The planner is the one place that knows the context window and counts the prompt; the command line,
the nodes and the Python API ask it, so "fits" means the same everywhere:

  - the context length comes from the checkpoint's text config (:func:`context_length`);
  - the whole first prompt is counted with the checkpoint's own chat template and tokenizer (system
    prompt, the video's placeholder tokens with every per-frame timestamp label or LLaVA-Video's time
    instruction, newline tokens, the question), see :class:`~comfy_visionzip.prompt.PromptBuilder`;
  - visual tokens per frame come from the family's own arranging code run on zeros
    (:func:`~comfy_visionzip.projection.visual_layout`);
  - room is reserved for the answer (``max_new_tokens``) and, where asked, for follow-up turns.

It fits in two places of a run, with the same counting: before decoding (:func:`plan_budget`: which
frames to sample) and before every prefill of a chat (:func:`fit_turn`: a first question whose
compressed video does not fit is thinned, a follow-up that does not fit is refused).

Policies: ``fit`` (default) thins the asked frame plan evenly until it fits and says so; ``strict``
refuses with the numbers and how to fix them. The planned prompt length is the prefilled one, to
the token (the chat checks it again before every prefill and never runs past the context).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import VisionZipError
from .models.base import PromptVideo, VisionLanguageModel, VisualLayout
from .pipeline import video_source
from .projection import frame_placeholders, video_layout, visual_layout
from .prompt import Message, PromptBuilder
from .settings import Compression
from .temporal import Temporal, thin
from .tokens import CompressedVideo
from .video import FramesHandle, VideoHandle, uniform_pick
from .zip import split_tokens

log = logging.getLogger(__name__)

POLICIES = ("fit", "strict")
# tokens per image tried by tokens_per_frame="auto", most first: the paper's LLaVA-1.5 settings, then below
TOKEN_LADDER = (192, 128, 64, 32, 16)


def _check_int(name: str, value: object, low: int) -> int:
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
    _check_int("token_budget", token_budget, 1)
    _check_int("tokens_per_frame", tokens_per_frame, 1)
    _check_int("reserved", reserved, 0)
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
        reserve = f" + answer {self.answer_tokens}"
        if self.follow_up_tokens:
            reserve += f" + follow-ups {self.follow_up_tokens}"
        split = f" ({self.dominant}+{self.contextual} per image)" if self.method == "visionzip" else f" ({self.method})"
        unit = self.frames_per_unit
        units = -(-self.frames // unit)
        once = self.visual_tokens - units * self.per_frame
        extra = f" + {once} closing newline" if once else ""
        frames = f"{self.frames} frames" if unit == 1 else f"{self.frames} frames = {units} temporal patches of {unit}"
        what = "tokens" if unit == 1 else "tokens each"
        if self.temporal is not None:
            lines = f" + {self.newlines} newline{'s' if self.newlines != 1 else ''}" if self.newlines else ""
            head = (f"{frames} x at most {self.per_frame} {what}{split}, "
                    f"up to {self.visual_tokens - self.newlines} visual "
                    f"tokens{lines} after the temporal stage; prompt at most {self.prompt_tokens}{reserve}")
        else:
            head = (f"{frames} x {self.per_frame} {what}{split} = {units * self.per_frame} visual tokens"
                    f"{extra}; prompt {self.prompt_tokens}{reserve}")
        head = (f"{head} = {self.total_tokens} of {self.budget} tokens"
                f"{' (the context)' if self.budget == self.context else f' (context {self.context})'}")
        return "; ".join([head, *self.reasons])


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
    budget = _check_int("budget", budget, 0)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    follow_up_tokens = _check_int("follow_up_tokens", follow_up_tokens, 0)
    if not isinstance(question, str) or not question.strip():
        raise VisionZipError("the question is empty")
    settings = compression or Compression.parse(method=method, dominant=dominant, contextual=contextual,
                                                tokens_per_frame=tokens_per_frame, temporal=temporal)
    auto, temporal_on = settings.auto, settings.temporal
    method = settings.method
    context = _check_int("context", context, 1) if context else context_length(vlm)
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
        raise VisionZipError(f"the budget of {budget} tokens leaves no room for the video after reserving "
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
        reasons.append(f"{layout.per_image} tokens per image ({d}+{c}): "
                       + ("the most of " + "/".join(map(str, TOKEN_LADDER)) + " at which every asked frame fits"
                          if asked_count <= limit else "the fewest tried, and still too many frames"))
    frames = len(asked)
    if asked_count > limit:
        fitted = fit_frames(count, limit, len(asked))
        numbers_ = (f"the asked {len(asked)} frames x {layout.per_frame} tokens make a prompt of {asked_count} tokens; "
                    f"with {max_new_tokens} for the answer"
                    f"{f' and {follow_reserve} for follow-ups' if follow_reserve else ''} "
                    f"that is {asked_count + budget - limit} > {budget}")
        if fitted == 0:
            raise VisionZipError(f"not even one frame fits: {numbers_}; raise the budget, use fewer tokens per frame "
                                 "or a smaller max_new_tokens")
        if policy == "strict":
            raise VisionZipError(f"the plan does not fit: {numbers_}; ask for at most {fitted} frames "
                                 "(num_frames / max_frames), fewer tokens per frame, or policy 'fit'")
        frames = fitted
        reasons.append(f"fit: {numbers_}, so {fitted} of the {len(asked)} asked frames are kept, evenly spread")
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
    if visual_budget is not None:  # the temporal stage: at most what is new, within the room
        settings = settings.with_temporal_budget(visual_budget)
        most = min(visual_tokens, visual_budget + layout.besides_tokens(frames))
        prompt_tokens, visual_tokens = prompt_tokens - visual_tokens + most, most
    return BudgetPlan(
        video=thinned, frames=frames, asked_frames=len(asked), indices=chosen, timestamps=chosen_times,
        compression=settings, per_frame=layout.per_frame, visual_tokens=visual_tokens,
        prompt_tokens=prompt_tokens, answer_tokens=max_new_tokens, follow_up_tokens=follow_reserve, budget=budget,
        context=context, policy=policy, reasons=reasons, frames_per_unit=layout.frames_per_unit,
        newlines=layout.besides_tokens(frames),
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
    why = (f"temporal: {frames} of the asked {len(asked)} frames kept ({fitted} fit without the stage; up to "
           f"{expand:g}x as many); tokens repeating an earlier frame are dropped; {room}")
    return frames, budget, why


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
    room = f" and {reserve} for follow-ups" if reserve else ""
    shown = f"{frames} frames x {per_frame} tokens"
    if video.repeats is not None:  # the temporal stage: frames differ
        shown = f"{frames} frames ({video.total_tokens} visual tokens after the temporal stage)"
    numbers_ = (f"{shown} make a prompt of {prompt_tokens} tokens, plus "
                f"{answer_tokens} for the answer{room} = {need} > the context of {context}")
    if policy == "strict" or fitted == 0:
        fix = (f"use at most {fitted} frames, fewer tokens per frame, or policy 'fit'" if fitted
               else "fewer tokens per frame, a shorter question or a smaller max_new_tokens")
        raise VisionZipError(f"the video does not fit: {numbers_}; {fix}")
    thinned = thin(video, uniform_pick(frames, fitted))
    prompt = count(fitted) - keep
    note = (f"fitted to the context: {numbers_}; kept {fitted} of {frames} frames (evenly spread): "
            f"prompt {prompt} + answer {answer_tokens}{f' + follow-ups {reserve}' if reserve else ''} <= {context}")
    log.warning("%s", note)
    return TurnFit(thinned, note)


__all__ = ["POLICIES", "TOKEN_LADDER", "BudgetPlan", "TurnFit", "cap_budget", "compressed_prompt", "context_length",
           "fit_frames", "fit_turn", "frames_for_budget", "plan_budget", "thinned_prompt"]
