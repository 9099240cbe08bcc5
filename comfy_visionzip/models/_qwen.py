"""What Qwen2.5-VL and Qwen3-VL share as families: the parts of the model, a vision tower whose 2x2
merger already projects into the language model's width, the prompt's vision span, and 3D (time,
height, width) rotary positions in the language model.

The pieces live beside it, split the way transformers splits a family: processing
(:mod:`~comfy_visionzip.models.qwen_processing`), the vision side and VisionZip's reading of it
(:mod:`~comfy_visionzip.models.qwen_vision`, whose docstring gives the semantics and where they differ
from the authors' release), and positions (:mod:`~comfy_visionzip.models.qwen_positions`).

A "frame" of a compressed Qwen video is one temporal patch (two sampled frames; an odd last frame is
repeated, as the processor does); its timestamp is the mean of its two frames' times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..encoded import EncodedImages
from ..preprocess import Preprocess
from ..tokens import CompressedVideo
from .base import ChatView, FamilyModule, PromptVideo, VisionLanguageModel, VisualLayout
from .qwen_positions import VideoCells, continued, first_prompt_positions
from .qwen_processing import qwen_preprocess
from .qwen_vision import QwenEncoder

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class QwenFamily(FamilyModule):
    """The interface of :class:`~comfy_visionzip.models.base.FamilyModule` for the Qwen families."""

    video_input = "video"
    window = False  # Qwen2.5-VL: window attention in most vision blocks
    timestamp_text = False  # Qwen3-VL: "<t seconds>" before each temporal patch

    # ---- parts of the model (transformers 5: model.model.{visual, language_model}; 4.x: model.visual, model.model)
    def visual(self, vlm: VisionLanguageModel) -> torch.nn.Module:
        inner = getattr(vlm.model, "model", None)
        return getattr(inner, "visual", None) or vlm.model.visual

    def language_model(self, vlm: VisionLanguageModel) -> torch.nn.Module:
        inner = vlm.model.model
        return getattr(inner, "language_model", inner)

    def rope_owner(self, vlm: VisionLanguageModel) -> Any:
        inner = getattr(vlm.model, "model", None)
        return inner if hasattr(inner, "get_rope_index") else vlm.model

    # ---- vision
    def preprocess(self, vlm: VisionLanguageModel) -> Preprocess:
        return qwen_preprocess(vlm.video_config or vlm.image_config, video=True)

    def encoder(self, vlm: VisionLanguageModel) -> QwenEncoder:
        return QwenEncoder(self.visual(vlm), self.preprocess(vlm), window=self.window)

    def qwen_encoder(self, vlm: VisionLanguageModel) -> QwenEncoder:
        """The model's encoder, which this family made (a QwenEncoder)."""
        encoder = vlm.video_encoder()
        if not isinstance(encoder, QwenEncoder):
            raise TypeError(f"a {self.display} model runs a QwenEncoder, not a {type(encoder).__name__}")
        return encoder

    def token_width(self, vlm: VisionLanguageModel) -> int:
        encoder = self.qwen_encoder(vlm)
        return encoder.width * (1 + encoder.deepstack)

    def project(self, vlm: VisionLanguageModel, video: CompressedVideo) -> torch.Tensor:
        """The main features of the kept tokens (the tower's merger already projected them)."""
        width = self.qwen_encoder(vlm).width
        tokens = video.tokens.to(vlm.device, vlm.dtype)[..., :width]
        keep = video.keep
        return tokens[keep.to(tokens.device)] if keep is not None else tokens.reshape(-1, width)

    def layout(self, vlm: VisionLanguageModel, *, method: str, dominant: int, contextual: int,
               frame_size: Sequence[int] | None) -> VisualLayout:
        """One row of kept tokens per temporal patch, no newline tokens; small frames keep all theirs."""
        encoder = self.qwen_encoder(vlm)
        size = (int(frame_size[0]), int(frame_size[1])) if frame_size else None
        full = encoder.tokens_for(size) if size else encoder.tokens_per_image
        probe = EncodedImages(torch.zeros(1, full, 1), torch.zeros(1, full), torch.zeros(1, full, 1), False,
                              encoder.grid_for(size) if size else (1, full))
        # the encoder's own count (small frames too)
        per = encoder.zip(probe, dominant, contextual, method).tokens.shape[1]
        return VisualLayout(per_frame=int(per), extra=0, crops=1, per_image=int(per), frames_per_unit=encoder.temporal)

    # ---- prompt
    def content_kind(self, video: CompressedVideo) -> str:
        """A single picture without times goes in as an image (image_pad, image grid), the rest as video."""
        return "image" if video.num_frames == 1 and not video.timestamps else "video"

    def time_text(self, video: PromptVideo) -> str:
        return ""  # times are in the positions (Qwen2.5-VL) or before each temporal patch (Qwen3-VL)

    def placeholder_span(self, token_text: str) -> str:
        return VISION_START + token_text + VISION_END

    def visual_text(self, token_text: str, kind: str, video: PromptVideo, per_frame: int | None, stamps: bool) -> str:
        """The text replacing the template's vision part (vision_start + pads + vision_end; Qwen3-VL: one
        such span per temporal patch, after its time)."""
        count = video.visual_tokens // max(video.num_frames, 1) if per_frame is None else per_frame
        counts = list(video.frame_tokens) if video.frame_tokens and per_frame is None else [count] * video.num_frames
        if self.timestamp_text and kind == "video":
            times = video.timestamps if video.timestamps else [0.0] * video.num_frames  # the model's format needs them
            return "".join(f"<{t:.1f} seconds>{VISION_START}{token_text * n}{VISION_END}"
                           for t, n in zip(times, counts))
        total = video.visual_tokens if per_frame is None else per_frame * video.num_frames
        return VISION_START + token_text * total + VISION_END

    # ---- running the language model
    def chat_state(self, vlm: VisionLanguageModel, video: CompressedVideo) -> dict[str, Any]:
        """The kept tokens' cells (for positions) and DeepStack features."""
        encoder = self.qwen_encoder(vlm)
        width = encoder.width
        positions = video.require_positions("a Qwen model")
        deep = []
        if encoder.deepstack:
            tokens = video.tokens.to(vlm.device, vlm.dtype)
            keep = video.keep
            deep = [tokens[..., width * (i + 1): width * (i + 2)] for i in range(encoder.deepstack)]
            deep = [d[keep.to(d.device)] if keep is not None else d.reshape(-1, width) for d in deep]
        times = list(video.timestamps)
        # seconds between temporal patches (the processor's temporal_patch_size / fps); the last patch may hold a
        # repeated frame, so it is left out where there are others
        span = times[:-1] if len(times) > 2 else times
        spacing = round((span[-1] - span[0]) / (len(span) - 1), 6) if len(span) > 1 else 1.0
        grid = (int(video.grid[0]), int(video.grid[1]))
        cells = VideoCells(grid=grid, positions=positions.long(), keep=video.keep, spacing=float(spacing),
                           merge=encoder.merge)
        return {"cells": cells, "deepstack": deep, "rope": None}

    def positions(self, chat: ChatView, ids: list[int]) -> torch.Tensor:
        """(3, len(ids)): the first prompt's positions from the model's rope index, then one more per token
        after its largest position (generated answers and follow-ups, as ``generate`` continues)."""
        state = chat.family_state
        first = chat.first_prompt_length or len(ids)
        key = tuple(ids[:first])
        if state["rope"] is None or state["rope"][0] != key:
            head = first_prompt_positions(self.rope_owner(chat.vlm), state["cells"], list(key), chat.kind,
                                          chat.token_id)
            state["rope"] = (key, head)
        return continued(state["rope"][1], len(ids))

    def run(self, chat: ChatView, emb: torch.Tensor, ids: list[int], start: int,
            cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Run ids[start:] (embedded as ``emb``) with their positions; returns (last logits, cache)."""
        position_ids = self.positions(chat, ids)[:, start:].unsqueeze(1).to(emb.device)  # (3, 1, L)
        out = chat.vlm.model(inputs_embeds=emb, position_ids=position_ids, **cache_kwargs)
        return out.logits[0, -1].float(), getattr(out, chat.cache_kwarg)


__all__ = ["QwenFamily"]
