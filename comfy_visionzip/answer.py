"""Answering from compressed visual tokens: projection, prompt building, generation, multi-turn chat.

How visual tokens reach the language model (no patching): the prompt is rendered with the checkpoint's
chat template, its image/video placeholder is expanded to one placeholder token per visual token (as
the model's own processor does), the text is tokenised, and the placeholder positions of the input
embeddings are filled with the projected tokens (the documented ``inputs_embeds`` path). Any number of
tokens per frame works, so VisionZip's 64 instead of 576 need nothing special.

The KV cache is kept between turns: a follow-up question only prefills its own new text (the video's
tokens are question-agnostic, VisionZip's multi-turn advantage). :meth:`Chat.fork` copies the cache
before branching a conversation, because generation mutates it in place.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .encoder import CompressedVideo
from .errors import VisionZipError
from .vlm import VisionLanguageModel

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


@dataclass
class Turn:
    question: str
    answer: str
    new_tokens: int  # tokens generated
    prefill_tokens: int  # tokens run through the model before generating (the cache covered the rest)
    cached_tokens: int  # tokens reused from the cache
    seconds: dict[str, float] = field(default_factory=dict)


def project(vlm: VisionLanguageModel, video: CompressedVideo) -> torch.Tensor:
    """(N, D_text): every visual token of the video, projected by the model's own projector, in prompt order.

    Family details reproduced exactly for uncompressed input ("full"): LLaVA-OneVision pools each frame
    2x bilinearly after projecting and ends the video with its ``image_newline``; LLaVA-NeXT-Video's
    2x2 pooling happened in the encoder; LLaVA-NeXT packs its anyres tiles (unpadded, a newline per
    row). With VisionZip the compressed tokens replace that pooling / packing (NeXT: a newline per frame).
    """
    check_compatible(vlm, video)
    inner = vlm.inner
    tokens = video.tokens.to(vlm.device, vlm.dtype)  # (frames, K, D_vision)
    with torch.inference_mode():
        projected = inner.multi_modal_projector(tokens)  # (frames, K, D_text)
        family = vlm.family.model_type
        if family == "llava_onevision":
            if video.method == "full":
                projected = inner.apply_pooling(projected)
            flat = projected.reshape(-1, projected.shape[-1])
            return torch.cat([flat, inner.image_newline[None].to(flat)], dim=0)
        if family == "llava_next":
            size = video.meta.get("frame_size")
            if video.method == "full" and video.crops > 1 and size:
                # uncompressed: the model's own packing (unpad the tile grid, a newline after every row)
                strategy = vlm.config.get("vision_feature_select_strategy", "default")
                per_crop = projected.view(projected.shape[0], video.crops, -1, projected.shape[-1])
                packed = []
                for frame in per_crop:
                    out = inner.pack_image_features([frame], torch.tensor([list(size)]), strategy,
                                                    image_newline=inner.image_newline)[0]
                    packed.append(torch.cat(list(out)) if isinstance(out, (list, tuple)) else out)  # 5.x: a list
                return torch.cat(packed, dim=0)
            # compressed tokens have no rows: one image_newline closes each frame
            newline = inner.image_newline[None, None].to(projected).expand(projected.shape[0], 1, -1)
            projected = torch.cat([projected, newline], dim=1)
        return projected.reshape(-1, projected.shape[-1])


def check_compatible(vlm: VisionLanguageModel, video: CompressedVideo) -> None:
    """Tokens made with another model cannot be projected by this one: a clear error naming both."""
    made_with = video.meta.get("family"), video.meta.get("vision_hidden")
    hidden = int(video.tokens.shape[-1])
    expected = int(getattr(vlm.inner, vlm.family.video_tower).config.hidden_size)
    if hidden != expected or (made_with[0] and made_with[0] != vlm.family.model_type):
        raise VisionZipError(
            f"these tokens were made with {video.meta.get('model', 'another model')} ({made_with[0] or 'unknown family'}, "
            f"vision width {hidden}); {vlm.name} is {vlm.family.model_type} with vision width {expected}: "
            "encode the video again with this model"
        )


def _placeholder(vlm: VisionLanguageModel) -> tuple[str, int, str]:
    """(content type for the template, placeholder token id, its text) for frames of this family."""
    config = vlm.config
    if vlm.family.video_input == "video":
        token_id = config.get("video_token_index", config.get("video_token_id"))
        kind = "video"
    else:
        token_id = config.get("image_token_index", config.get("image_token_id"))
        kind = "image"
    if token_id is None:
        raise VisionZipError(f"{vlm.path}: config.json names no {kind} token id")
    return kind, int(token_id), vlm.tokenizer.convert_ids_to_tokens(int(token_id))


def _chat_template(vlm: VisionLanguageModel) -> str:
    import json
    import os

    for name in ("chat_template.jinja",):
        path = os.path.join(vlm.path, name)
        if os.path.isfile(path):
            return open(path, encoding="utf-8").read()
    path = os.path.join(vlm.path, "chat_template.json")
    if os.path.isfile(path):
        return json.load(open(path, encoding="utf-8"))["chat_template"]
    if getattr(vlm.tokenizer, "chat_template", None):
        return vlm.tokenizer.chat_template
    raise VisionZipError(f"{vlm.path}: no chat template (chat_template.jinja / .json or in the tokenizer config)")


def time_instruction(video: CompressedVideo) -> str:
    """LLaVA-Video's wording for where the sampled frames lie in time."""
    times = ", ".join(f"{t:.2f}s" for t in video.timestamps)
    length = video.meta.get("duration") or (video.timestamps[-1] if video.timestamps else 0.0)
    return (f"The video lasts for {length:.2f} seconds, and {video.num_frames} frames are sampled from it. "
            f"These frames are located at {times}. Please answer the following questions related to this video.\n")


def _logits_kwarg(model) -> str | None:
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
    """

    def __init__(self, vlm: VisionLanguageModel, video: CompressedVideo, *, timestamps: bool = True,
                 system: str | None = None) -> None:
        self.vlm = vlm
        self.video = video
        self.kind, self.token_id, self.token_text = _placeholder(vlm)
        self.template = _chat_template(vlm)
        self.timestamps = timestamps and bool(video.timestamps)
        self.system = system
        t = time.perf_counter()
        self.visual = project(vlm, video)  # (N, D_text)
        self.project_seconds = time.perf_counter() - t
        self.messages: list[dict] = []
        self.turns: list[Turn] = []
        self.cache = None
        self.cached_ids: list[int] = []
        self.pending: int | None = None  # the last generated token: produced but not yet run through the model
        self._logits_kwarg = _logits_kwarg(vlm.model)

    # ---- prompt
    def _visual_text(self) -> str:
        per_frame = self.visual.shape[0] // max(self.video.num_frames, 1)
        if self.kind == "video":
            return self.token_text * self.visual.shape[0]
        parts = []
        for k in range(self.video.num_frames):
            label = f"frame at {self.video.timestamps[k]:.1f} s: " if self.timestamps else ""
            parts.append(label + self.token_text * per_frame)
        return "\n".join(parts)

    def render(self, messages: list[dict], *, generation_prompt: bool = True) -> str:
        """The conversation as text, visual tokens expanded (what gets tokenised)."""
        convo = []
        if self.system:
            convo.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for i, m in enumerate(messages):
            if m["role"] == "user" and i == 0:
                text = (time_instruction(self.video) if self.timestamps and self.kind == "video" else "") + m["text"]
                content = [{"type": self.kind}, {"type": "text", "text": text}]
            else:
                content = [{"type": "text", "text": m["text"]}]
            convo.append({"role": m["role"], "content": content})
        text = self.vlm.tokenizer.apply_chat_template(convo, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        if text.count(self.token_text) != 1:
            raise VisionZipError(f"the chat template rendered {text.count(self.token_text)} {self.token_text!r} "
                                 "placeholders for one video; expected exactly one")
        return text.replace(self.token_text, self._visual_text())

    def _ids(self, messages: list[dict]) -> list[int]:
        ids = self.vlm.tokenizer(self.render(messages), add_special_tokens=True)["input_ids"]
        count = sum(1 for i in ids if i == self.token_id)
        if count != self.visual.shape[0]:
            raise VisionZipError(
                f"prompt and visual tokens do not match: the prompt holds {count} placeholder tokens, the video "
                f"{self.visual.shape[0]} ({self.video.num_frames} frames x {self.video.tokens_per_frame} tokens per frame)"
            )
        return ids

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

    def _run(self, emb: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        kwargs = {"inputs_embeds": emb, "past_key_values": self.cache, "use_cache": True}
        if self._logits_kwarg:
            kwargs[self._logits_kwarg] = 1
        with torch.inference_mode():
            out = self.vlm.model(**kwargs)
        self.cache = out.past_key_values
        return out.logits[0, -1].float()

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, int, int]:
        """Run what the cache does not cover yet; returns (next-token logits, tokens run, tokens reused)."""
        common = 0
        limit = min(len(ids) - 1, len(self.cached_ids))  # always run at least the last token
        while common < limit and ids[common] == self.cached_ids[common]:
            common += 1
        if common == 0:
            self.cache = None
        elif common < len(self.cached_ids):
            self.cache.crop(common - len(self.cached_ids))  # negative: drop that many (transformers 4.50 and 5.x)
        logits = self._run(self._embed(ids, common))
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
        ids = self._ids(messages)
        t1 = time.perf_counter()
        logits, prefilled, reused = self.prefill(ids)
        t2 = time.perf_counter()
        try:
            answer, generated = self._generate(logits, config, on_text, progress)
        except BaseException:
            self.cache, self.cached_ids = None, []  # half a turn in the cache: start clean next time
            raise
        t3 = time.perf_counter()
        self.messages = [*messages, {"role": "assistant", "text": answer}]
        self.turns.append(Turn(question, answer, generated, prefilled, reused,
                               {"prompt": t1 - t0, "prefill": t2 - t1, "generate": t3 - t2}))
        return answer

    def _generate(self, logits: torch.Tensor, config: GenerationConfig, on_text, progress) -> tuple[str, int]:
        tokenizer = self.vlm.tokenizer
        eos = set(_as_list(self.vlm.model.generation_config.eos_token_id) or []) | {tokenizer.eos_token_id}
        generator = torch.Generator(device="cpu").manual_seed(int(config.seed))
        out: list[int] = []
        shown = ""
        placeholders = [i for i in (self.vlm.config.get("image_token_index"), self.vlm.config.get("video_token_index"))
                        if isinstance(i, int) and i < logits.shape[-1]]
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
            if stop_at >= 0:
                break
            self.cached_ids.append(token)
            logits = self._run(self._embed(self.cached_ids, len(self.cached_ids) - 1))
        return shown.strip(), len(out)

    def fork(self) -> Chat:
        """A copy of this conversation (and its cache) to branch from; the original is left untouched."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.cached_ids = list(self.cached_ids)
        other.messages = list(self.messages)
        other.turns = list(self.turns)
        return other


def _as_list(value) -> list:
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
