"""Answering from compressed visual tokens: projection, prompt building, generation, multi-turn chat.

How visual tokens reach the language model (no patching): the prompt is rendered with the checkpoint's
chat template, its image/video placeholder is expanded to one placeholder token per visual token (as
the model's own processor does), the text is tokenised, and the placeholder positions of the input
embeddings are filled with the projected tokens (the documented ``inputs_embeds`` path). Any number of
tokens per frame works, so VisionZip's 64 instead of 576 need nothing special.

The KV cache is kept between turns: a follow-up question only prefills its own new text (the video's
tokens are question-agnostic, VisionZip's multi-turn advantage). :meth:`Chat.fork` copies the cache
before branching a conversation, because generation mutates it in place.

No prefill runs past the model's context: every prompt is counted before it runs (the same
:class:`~comfy_visionzip.prompt.PromptBuilder` the budget planner counts with); a first question whose
video does not fit is thinned evenly (policy "fit") or refused ("strict"), a follow-up that would not
fit is refused with the numbers (the planner decides: :func:`~comfy_visionzip.budget.fit_turn`).
Projection lives in :mod:`~comfy_visionzip.projection`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from .adapter import adapter_note
from .budget import POLICIES, context_length, fit_turn
from .errors import VisionZipError
from .models.base import PromptVideo, VisionLanguageModel
from .projection import frame_placeholders, project
from .prompt import Message, PromptBuilder
from .tokens import CompressedVideo

__all__ = ["Chat", "GenerationConfig", "Turn", "project"]

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """How to generate. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise VisionZipError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (0 <= self.temperature <= 10):
            raise VisionZipError(f"temperature must be between 0 (greedy) and 10, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise VisionZipError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise VisionZipError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")


@dataclass
class Turn:
    question: str
    answer: str
    new_tokens: int  # tokens generated
    prefill_tokens: int  # tokens run through the model before generating (the cache covered the rest)
    cached_tokens: int  # tokens reused from the cache
    seconds: dict[str, float] = field(default_factory=dict)


def _logits_kwarg(model: Any) -> str | None:
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


class Chat:
    """A conversation about one compressed video, with the KV cache kept between turns.

    Args:
        vlm: the loaded model.
        video: compressed visual tokens (from :func:`~comfy_visionzip.encoder.compress_frames`).
        timestamps: tell the model when frames were taken ("frame at 12.5 s" for image models,
            LLaVA-Video's time instruction for video models); only where the video has timestamps.
        system: an optional system message (if the chat template supports one).
        policy: what the first question does when the prompt plus the answer (``max_new_tokens``)
            would not fit the model's context: "fit" (default) drops frames evenly until it fits and
            says so in :attr:`note`; "strict" refuses with the numbers. A follow-up that would not fit
            is always refused: no prefill ever runs past the context.
        context: the context length in tokens (default: the checkpoint's, see
            :func:`~comfy_visionzip.budget.context_length`).
        reserve: tokens the first question leaves free for follow-up turns (their questions and
            answers): with it, prompt + answer + reserve must fit, and "fit" thins the video for it.
    """

    def __init__(self, vlm: VisionLanguageModel, video: CompressedVideo, *, timestamps: bool = True,
                 system: str | None = None, policy: str = "fit", context: int | None = None,
                 reserve: int = 0) -> None:
        if policy not in POLICIES:
            raise VisionZipError(f"unknown policy {policy!r}; valid: fit (drop frames to fit), strict (refuse)")
        if not isinstance(vlm, VisionLanguageModel):
            raise VisionZipError(f"{vlm.name} is a bare vision tower: it has no language model to answer with; "
                                 "load a vision-language checkpoint (Load VLM) to ask questions")
        self._vlm: VisionLanguageModel | None = vlm
        self._held = _model_key(vlm)  # which model the conversation's cache belongs to (see resume())
        self.video = video
        self._prompt: PromptBuilder | None = PromptBuilder(
            vlm, system=system, timestamps=timestamps and bool(video.timestamps), kind=vlm.family.content_kind(video))
        self.kind, self.token_id, self.token_text = self.prompt.kind, self.prompt.token_id, self.prompt.token_text
        self.template = self.prompt.template
        self.timestamps = self.prompt.timestamps
        self.system = system
        self.policy = policy
        self.context = int(context) if context else context_length(vlm)
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise VisionZipError(f"reserve must be an integer >= 0 (tokens kept for follow-ups), got {reserve!r}")
        self.reserve = reserve
        self.note = ""  # what the fit policy changed, if anything
        # the model's projector adapter was tuned for other compression settings than these tokens' ("" if not)
        self.adapter_note = adapter_note(vlm, video.method, video.dominant, video.contextual)
        self._asking: int | None = None  # the first prompt's length while the first turn runs
        t = time.perf_counter()
        self.visual = project(vlm, video)  # (N, D_text)
        self.frame_tokens = frame_placeholders(vlm, video)  # per frame, where the temporal stage made them differ
        self.family_state = vlm.family.chat_state(vlm, video)  # what else the family runs with (positions, DeepStack)
        self.project_seconds = time.perf_counter() - t
        self.messages: list[Message] = []
        self.turns: list[Turn] = []
        self.cache: Any = None
        self.cached_ids: list[int] = []
        self.pending: int | None = None  # the last generated token: produced but not yet run through the model
        self.conversation_ids: list[int] = []  # ids of the conversation so far, generated answers as generated
        self._logits_kwarg = _logits_kwarg(vlm.model)
        # transformers >= 5.2x calls the cache `cache` (past_key_values is deprecated); 4.50 only knows past_key_values
        self.cache_kwarg = "cache" if "cache" in inspect.signature(vlm.model.forward).parameters else "past_key_values"

    @property
    def vlm(self) -> VisionLanguageModel:
        """The model the conversation runs on (a parked conversation has none: :meth:`resume` first)."""
        if self._vlm is None:
            raise VisionZipError("this conversation is parked (it let go of its model between turns): call "
                                 "resume(vlm) with the model before asking")
        return self._vlm

    @property
    def prompt(self) -> PromptBuilder:
        if self._prompt is None:
            self._prompt = PromptBuilder(self.vlm, system=self.system, timestamps=self.timestamps, kind=self.kind)
        return self._prompt

    @property
    def parked(self) -> bool:
        """Whether the conversation let go of its model (see :meth:`park`)."""
        return self._vlm is None

    # ---- between turns
    def park(self, device: str | torch.device = "cpu") -> None:
        """Between turns: move what the conversation keeps (its KV cache, the projected visual tokens, the family's
        state) to ``device``, the CPU by default, so that nothing waits in GPU memory; and let go of the model, so
        that unloading the model frees it even while the conversation is kept. :meth:`resume` brings the
        conversation back to a model before the next question (:meth:`ask` on a parked conversation refuses)."""
        target = torch.device(device)
        self.cache = _cache_to(self.cache, target)
        self.visual = self.visual.to(target)
        self.family_state = _moved(self.family_state, target)
        self._vlm = None
        self._prompt = None  # it holds the model too; rebuilt (from the chat template) on resume

    def resume(self, vlm: VisionLanguageModel) -> None:
        """Bring a parked conversation back to ``vlm`` (the same checkpoint, loaded again or not): its cache and
        tokens move to the model's device. Another checkpoint, or the same one in another dtype, is refused: the
        cache belongs to the model that made it."""
        if _model_key(vlm) != self._held:
            raise VisionZipError(f"this conversation was held by {self._held[1]} ({self._held[2]}); resume it "
                                 f"with that model, not {vlm.name} ({str(vlm.dtype).removeprefix('torch.')})")
        self._vlm = vlm
        self.cache = _cache_to(self.cache, vlm.device)
        self.visual = self.visual.to(vlm.device)
        self.family_state = _moved(self.family_state, vlm.device)

    @property
    def placeholder_ids(self) -> list[int]:
        """The image / video placeholder ids of this checkpoint (never generated: they are not words)."""
        config = self.vlm.config
        keys = ("image_token_index", "image_token_id", "video_token_index", "video_token_id")
        return sorted({config[k] for k in keys if isinstance(config.get(k), int)})

    @property
    def first_prompt_length(self) -> int | None:
        """Tokens of the first turn's prompt (where the first answer began), once asked."""
        if not self.turns:
            return self._asking
        return self.turns[0].prefill_tokens + self.turns[0].cached_tokens

    # ---- prompt
    def prompt_video(self) -> PromptVideo:
        """What the prompt says about the video (frames, visual tokens, times)."""
        video = self.video
        return PromptVideo(video.num_frames, int(self.visual.shape[0]), tuple(video.timestamps),
                           video.meta.get("duration"), self.frame_tokens)

    def render(self, messages: list[Message], *, generation_prompt: bool = True) -> str:
        """The conversation as text, visual tokens expanded (what gets tokenised)."""
        return self.prompt.render(self.prompt_video(), messages, generation_prompt=generation_prompt)

    def _ids(self, messages: list[Message]) -> list[int]:
        return self.prompt.ids(self.prompt_video(), messages)

    def _followup_ids(self, messages: list[Message]) -> list[int] | None:
        """The ids of a follow-up: the conversation's own ids (the answer as generated, not re-tokenised)
        followed by the template's text that closes the answer and asks the new question.

        Re-rendering the answer through the template does not always give back the generated ids
        (special tokens skipped when decoding, merges across the answer's edges), which would make the
        follow-up re-prefill the previous answer. None when the template does not render the earlier
        conversation as a prefix of the new one (then the whole conversation is tokenised again).
        """
        if not self.conversation_ids:
            return None
        info = self.prompt_video()
        earlier, answer = self.messages[:-1], self.messages[-1]["text"]
        asked = self.prompt.render(info, earlier)  # the last prompt, ending with the generation prompt
        answered = self.prompt.render(info, self.messages, generation_prompt=False)
        following = self.prompt.render(info, messages)
        at = answered.find(answer, len(asked)) if answered.startswith(asked) else -1
        if at < 0 or answered[len(asked):at].strip() or not following.startswith(answered):
            log.debug("the chat template does not extend the conversation as a prefix; re-tokenising it")
            return None
        delta = answered[at + len(answer):] + following[len(answered):]
        return self.conversation_ids + self.vlm.tokenizer(delta, add_special_tokens=False)["input_ids"]

    def _check_room(self, ids: list[int], messages: list[Message], config: GenerationConfig) -> list[int]:
        """The ids to prefill, once the planner says prompt + answer fit the context (it may thin the video)."""
        fit = fit_turn(self.vlm, self.prompt, self.video, messages, len(ids), first=not self.turns,
                       answer_tokens=config.max_new_tokens, reserve=self.reserve, context=self.context,
                       policy=self.policy)
        if not fit.thinned:
            return ids
        self.video, self.note = fit.video, fit.note
        self.visual = project(self.vlm, self.video)
        self.frame_tokens = frame_placeholders(self.vlm, self.video)
        self.family_state = self.vlm.family.chat_state(self.vlm, self.video)
        return self._ids(messages)

    # ---- model
    def _embed(self, ids: list[int], start: int) -> torch.Tensor:
        """Input embeddings of ids[start:], visual positions filled with their projected tokens."""
        device = self.vlm.device
        part = torch.tensor([ids[start:]], device=device)
        with torch.inference_mode():
            emb = self.vlm.model.get_input_embeddings()(part)
            mask = part[0] == self.token_id
            if mask.any():
                first = sum(1 for i in ids[:start] if i == self.token_id)  # visual tokens already cached
                count = int(mask.sum())
                emb[0, mask] = self.visual[first: first + count].to(emb.dtype)
        return emb

    def _run(self, emb: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
        """Run ids[start:] (embedded) through the model, the family's way; returns the next-token logits."""
        if self.cache is None:
            self.cache = DynamicCache()
        kwargs: dict[str, Any] = {self.cache_kwarg: self.cache, "use_cache": True}
        if self._logits_kwarg:
            kwargs[self._logits_kwarg] = 1
        with torch.inference_mode():
            logits, self.cache = self.vlm.family.run(self, emb, ids, start, kwargs)
        return logits

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, int, int]:
        """Run what the cache does not cover yet; returns (next-token logits, tokens run, tokens reused)."""
        if len(ids) > self.context:
            raise VisionZipError(f"a prompt of {len(ids)} tokens is longer than the context of {self.context}; "
                                 "nothing was run (ask() fits or refuses it with the numbers)")
        common = 0
        limit = min(len(ids) - 1, len(self.cached_ids))  # always run at least the last token
        while common < limit and ids[common] == self.cached_ids[common]:
            common += 1
        if common == 0:
            self.cache = None
        elif common < len(self.cached_ids):
            self.cache.crop(common - len(self.cached_ids))  # negative: drop that many (transformers 4.50 and 5.x)
        logits = self._run(self._embed(ids, common), ids, common)
        self.cached_ids = list(ids)
        return logits, len(ids) - common, common

    def ask(self, question: str, config: GenerationConfig | None = None,
            on_text: Callable[[str], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> str:
        """Ask a question; returns the answer.

        ``on_text`` receives the text as it is generated; ``progress(tokens, max_new_tokens)`` is called
        after every token (raise from it to stop: the conversation is then left as it was).
        """
        config = config or GenerationConfig()
        config.check()
        if not isinstance(question, str) or not question.strip():
            raise VisionZipError("the question is empty")
        t0 = time.perf_counter()
        messages = [*self.messages, {"role": "user", "text": question.strip()}]
        ids = self._followup_ids(messages) if self.turns else None
        ids = self._check_room(ids or self._ids(messages), messages, config)
        t1 = time.perf_counter()
        self._asking = None if self.turns else len(ids)
        logits, prefilled, reused = self.prefill(ids)
        t2 = time.perf_counter()
        try:
            answer, generated = self._generate(logits, config, on_text, progress)
        except BaseException:
            self.cache, self.cached_ids = None, []  # half a turn in the cache: start clean next time
            raise
        t3 = time.perf_counter()
        self.messages = [*messages, {"role": "assistant", "text": answer}]
        self.conversation_ids = list(self.cached_ids)  # the conversation as the model saw it, generated ids included
        self.turns.append(Turn(question, answer, generated, prefilled, reused,
                               {"prompt": t1 - t0, "prefill": t2 - t1, "generate": t3 - t2}))
        return answer

    def _generate(self, logits: torch.Tensor, config: GenerationConfig, on_text: Callable[[str], None] | None,
                  progress: Callable[[int, int], None] | None) -> tuple[str, int]:
        tokenizer = self.vlm.tokenizer
        eos = set(_as_list(self.vlm.model.generation_config.eos_token_id) or []) | {tokenizer.eos_token_id}
        generator = torch.Generator(device="cpu").manual_seed(int(config.seed))
        out: list[int] = []
        shown = ""
        placeholders = [i for i in self.placeholder_ids if i < logits.shape[-1]]
        for _ in range(config.max_new_tokens):
            if placeholders:  # an image/video placeholder is never a word to say
                logits = logits.index_fill(0, torch.tensor(placeholders, device=logits.device), -float("inf"))
            token = _pick(logits, config, generator)
            if token in eos:
                break
            out.append(token)
            if progress is not None:
                progress(len(out), config.max_new_tokens)
            text = tokenizer.decode(out, skip_special_tokens=True)
            stop_at = min((text.find(s) for s in config.stop if s and s in text), default=-1)
            if stop_at >= 0:
                text = text[:stop_at]
            if on_text is not None and len(text) > len(shown):
                on_text(text[len(shown):])
            shown = text
            if stop_at >= 0 or len(self.cached_ids) + 1 > self.context:
                break  # a stop string, or the context is full (never reached through ask(), which keeps room)
            self.cached_ids.append(token)
            logits = self._run(self._embed(self.cached_ids, len(self.cached_ids) - 1), self.cached_ids,
                               len(self.cached_ids) - 1)
        return shown.strip(), len(out)

    def fork(self) -> Chat:
        """A copy of this conversation (and its cache) to branch from; the original is left untouched."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.cached_ids = list(self.cached_ids)
        other.conversation_ids = list(self.conversation_ids)
        other.messages = list(self.messages)
        other.turns = list(self.turns)
        other.family_state = dict(self.family_state)  # the family writes into it (Qwen's rope): not the original's
        return other


def _model_key(vlm: VisionLanguageModel) -> tuple[str, str, str]:
    """What a KV cache belongs to: the family, the checkpoint and the dtype it ran in."""
    return vlm.family.model_type, vlm.name, str(vlm.dtype).removeprefix("torch.")


def _cache_to(cache: Any, device: torch.device) -> Any:
    """A transformers KV cache with every tensor on ``device``: its own tensors and lists of tensors
    (``key_cache``/``value_cache`` in transformers 4) and those of its layers (``layers`` in transformers 5, whose
    ``device`` is set too, else a layer would move its tensors back). Changed in place (a fork has its own copy).
    A cache whose tensors cannot all be found is dropped (the next question then prefills from the start)."""
    if cache is None:
        return None
    holders = [cache, *[layer for layer in getattr(cache, "layers", None) or [] if hasattr(layer, "__dict__")]]
    for holder in holders:
        for name, value in list(vars(holder).items()):
            if isinstance(value, torch.Tensor):
                setattr(holder, name, value.to(device))
            elif isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value):
                value[:] = [t.to(device) for t in value]
            elif name == "device" and isinstance(value, torch.device):
                setattr(holder, name, device)
    left = [t for holder in holders for t in _tensors(vars(holder)) if t.device != device]
    if left:
        log.debug("a KV cache of type %s kept tensors on %s; dropped", type(cache).__name__, left[0].device)
        return None
    return cache


def _tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 3:
        return []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item, depth + 1)]


def _moved(value: Any, device: torch.device, depth: int = 0) -> Any:
    """``value`` (a family's chat state: dicts, lists, tuples, dataclasses of tensors) with every tensor on
    ``device``; containers are rebuilt, never changed in place (a fork shares them with its parent)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if depth > 6:
        return value
    if isinstance(value, dict):
        return {k: _moved(v, device, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_moved(v, device, depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _moved(getattr(value, f.name), device, depth + 1) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _pick(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> int:
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < config.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
