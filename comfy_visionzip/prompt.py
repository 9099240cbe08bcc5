"""Prompt building: the conversation as the checkpoint's chat template renders it, visual placeholders
expanded to one placeholder token per visual token, timestamps told the family's way.

One :class:`PromptBuilder` serves both the chat (which tokenises the prompt it prefills) and the budget
planner (which counts the prompt of a plan before anything is decoded), so "the prompt is N tokens"
means the same number in both places.
"""

from __future__ import annotations

import json
import os
import sys
import time
from types import FrameType
from typing import Any

from .errors import VisionZipError
from .models.base import PromptVideo, VisionLanguageModel
from .words import counted

Message = dict[str, str]  # {"role": "user" | "assistant", "text": ...}


def chat_template(vlm: VisionLanguageModel) -> str:
    """The checkpoint's chat template (``chat_template.jinja`` / ``.json``, or the tokenizer's)."""
    path = os.path.join(vlm.path, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(vlm.path, "chat_template.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return str(json.load(f)["chat_template"])
    if getattr(vlm.tokenizer, "chat_template", None):  # a transformers tokenizer may have none
        return str(vlm.tokenizer.chat_template)
    raise VisionZipError(f"{vlm.path}: no chat template (chat_template.jinja / .json or in the tokenizer config)")


def placeholder(vlm: VisionLanguageModel, kind: str | None = None) -> tuple[str, int, str]:
    """(content type for the template, placeholder token id, its text) for frames of this family
    (``kind`` "image" / "video" overrides the family's usual one)."""
    config = vlm.config
    if (kind or vlm.family.video_input) == "video":
        token_id = config.get("video_token_index", config.get("video_token_id"))
        kind = "video"
    else:
        token_id = config.get("image_token_index", config.get("image_token_id"))
        kind = "image"
    if token_id is None:
        raise VisionZipError(f"{vlm.path}: config.json names no {kind} token id")
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(vlm.tokenizer):
        raise VisionZipError(f"{vlm.path}: config.json's {kind} token id {token_id!r} is not in the tokenizer's "
                             f"vocabulary of {len(vlm.tokenizer)}; the config and the tokenizer do not belong together")
    return kind, token_id, str(vlm.tokenizer.convert_ids_to_tokens(token_id))


def reserved_texts(vlm: VisionLanguageModel) -> list[str]:
    """The texts of the tokens a question may not contain: the image / video placeholders and the vision
    span markers the config names (typed into a question they would take the place of visual tokens)."""
    ids = {value for key, value in vlm.config.items()
           if key.endswith(("token_index", "token_id")) and key.startswith(("image", "video", "vision"))
           and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(vlm.tokenizer)}
    return sorted({str(vlm.tokenizer.convert_ids_to_tokens(i)) for i in ids})


TEMPLATE_SECONDS = 10.0  # a chat template that renders longer than this is refused (one that never ends)


class _Overtime(Exception):
    """Raised inside a chat template's rendering when it runs past its time."""


def render_template(vlm: VisionLanguageModel, convo: list[dict[str, Any]], template: str, generation_prompt: bool,
                    *, seconds: float | None = None) -> str:
    """The checkpoint's chat template rendered with transformers' own (sandboxed) renderer, within a time
    limit and with any failure turned into one line (templates raise on purpose, e.g. for an unknown role).

    The limit is kept with a trace function on this thread only (jinja compiles templates to Python), so it
    works in any thread, ComfyUI's worker included; nothing else is traced.
    """
    seconds = TEMPLATE_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + seconds
    steps = 0

    def tracer(_frame: FrameType, _event: str, _arg: Any) -> Any:
        nonlocal steps
        steps += 1
        if steps % 1000 == 0 and time.monotonic() > deadline:
            raise _Overtime
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        text = vlm.tokenizer.apply_chat_template(convo, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    except _Overtime:
        raise VisionZipError(f"{vlm.name}: its chat template did not finish rendering in {seconds:g} s (it loops); "
                             "fix or replace chat_template.jinja") from None
    except Exception as e:  # noqa: BLE001 - a template is the checkpoint's code: whatever it raises is one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise VisionZipError(f"{vlm.name}: its chat template refused the conversation ({first}); check the "
                             "question and the checkpoint's chat_template.jinja") from None
    finally:
        sys.settrace(previous)
    if not isinstance(text, str):
        raise VisionZipError(f"{vlm.name}: its chat template rendered a {type(text).__name__}, not text")
    return text


class PromptBuilder:
    """Renders and tokenises conversations about one video for one checkpoint.

    ``messages`` are ``{"role": "user" | "assistant", "text": ...}``; the video goes with the first user
    message, as the LLaVA processors put it.
    """

    def __init__(self, vlm: VisionLanguageModel, *, system: str | None = None, timestamps: bool = True,
                 kind: str | None = None) -> None:
        self.vlm = vlm
        self.family = vlm.family
        self.kind, self.token_id, self.token_text = placeholder(vlm, kind)
        self.template = chat_template(vlm)
        self.system = system
        self.timestamps = timestamps
        self.reserved = reserved_texts(vlm)

    def check_text(self, text: str, what: str = "the question") -> None:
        """Refuse text that holds one of the model's placeholder tokens (it would stand for a visual token)."""
        found = [t for t in self.reserved if t in text]
        if found:
            raise VisionZipError(f"{what} contains {found[0]!r}, the model's own marker for visual input "
                                 f"({text[:60]!r}...); remove it from the text")

    def _visual_text(self, video: PromptVideo, per_frame: int | None = None) -> str:
        """The placeholder run for the video (``per_frame`` overrides the count, for fast counting)."""
        stamps = self.timestamps and bool(video.timestamps)
        return self.family.visual_text(self.token_text, self.kind, video, per_frame, stamps)

    def render(self, video: PromptVideo, messages: list[Message], *, generation_prompt: bool = True,
               per_frame: int | None = None) -> str:
        """The conversation as text, visual tokens expanded (what gets tokenised)."""
        stamps = self.timestamps and bool(video.timestamps)
        for m in messages:
            if m["role"] == "user":
                self.check_text(m["text"])
        if self.system:
            self.check_text(self.system, "the system message")
        convo: list[dict[str, Any]] = []
        if self.system:
            convo.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for i, m in enumerate(messages):
            if m["role"] == "user" and i == 0:
                asked = (self.family.time_text(video) if stamps and self.kind == "video" else "") + m["text"]
                content = [{"type": self.kind}, {"type": "text", "text": asked}]
            else:
                content = [{"type": "text", "text": m["text"]}]
            convo.append({"role": m["role"], "content": content})
        text = render_template(self.vlm, convo, self.template, generation_prompt)
        if text.count(self.token_text) != 1:
            raise VisionZipError(f"the chat template rendered {text.count(self.token_text)} {self.token_text!r} "
                                 "placeholders for one video; expected exactly one")
        span = self.family.placeholder_span(self.token_text)
        if text.count(span) != 1:
            raise VisionZipError(f"the chat template did not render the vision part as {span!r}")
        return text.replace(span, self._visual_text(video, per_frame))

    def ids(self, video: PromptVideo, messages: list[Message]) -> list[int]:
        """The token ids of the conversation (what the model prefills), checked against the video."""
        ids: list[int] = self.vlm.tokenizer(self.render(video, messages), add_special_tokens=True)["input_ids"]
        count = sum(1 for i in ids if i == self.token_id)
        if count != video.visual_tokens:
            raise VisionZipError(
                f"prompt and visual tokens do not match: the prompt holds {count} placeholder tokens, the video "
                f"{video.visual_tokens} ({counted(video.num_frames, 'encoded frame')})"
            )
        return ids

    def count(self, video: PromptVideo, messages: list[Message]) -> int:
        """len(self.ids(video, messages)) without tokenising every placeholder.

        The placeholder is one special token the tokenizer never merges with its neighbours, so the
        prompt is rendered with one placeholder per frame (or per video) and the rest is added; the
        planner calls this in its search, and checks its final choice with :meth:`ids`.
        """
        text = self.render(video, messages, per_frame=1)
        ids = self.vlm.tokenizer(text, add_special_tokens=True)["input_ids"]
        shown = sum(1 for i in ids if i == self.token_id)
        return len(ids) - shown + video.visual_tokens
