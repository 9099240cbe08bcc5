"""The interface every model family implements, and the loaded model it is handed.

A family module says, for one transformers class: which tower frames go through and how they are
preprocessed (select layer, feature strategy, an optional resampler), how projected tokens are
arranged in the prompt (pooling, anyres packing, newline tokens), how many placeholders a video
becomes (:class:`VisualLayout`), what the prompt says around them, and how the language model is run.
Shared code asks the family; it never branches on ``model_type``. :class:`FamilyModule`'s own methods
are LLaVA-1.5's behaviour, the default every family starts from.

Encoders implement :class:`~comfy_visionzip.encoded.Encoder` (re-exported here): the CLIP / SigLIP /
DINOv2 :class:`~comfy_visionzip.encoder.VisionEncoder`, and the Qwen families' own encoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..devices import pick_device
from ..encoded import EncodedImages, Encoder
from ..encoder import VisionEncoder
from ..preprocess import Preprocess, crops_per_frame
from ..tokens import CompressedVideo, check_compatible

__all__ = ["ChatView", "Encoder", "FamilyModule", "PromptVideo", "VisionLanguageModel", "VisualLayout",
           "frame_label", "time_instruction"]


@dataclass(frozen=True)
class VisualLayout:
    """How many placeholder tokens a video becomes with one model and one setting."""

    per_frame: int  # placeholders per encoded frame (crops x tokens per image, plus any per-frame newline)
    extra: int  # placeholders once per video (LLaVA-OneVision's closing newline)
    crops: int  # images the tower sees per frame (anyres: the whole frame + tiles)
    per_image: int  # tokens each image keeps
    frames_per_unit: int = 1  # sampled frames per encoded frame (Qwen: two per temporal patch)

    def units(self, frames: int) -> int:
        """Encoded frames (temporal patches) that ``frames`` sampled frames make (an odd last one is repeated)."""
        return -(-frames // self.frames_per_unit)

    def total(self, frames: int) -> int:
        """Placeholders of a video of ``frames`` sampled frames."""
        return self.units(frames) * self.per_frame + self.extra

    def besides_tokens(self, frames: int) -> int:
        """Placeholders that are not visual tokens (newline tokens) in a video of ``frames`` frames."""
        return self.total(frames) - self.units(frames) * self.crops * self.per_image

    def encoded(self) -> VisualLayout:
        """The same layout counted in encoded frames (what a compressed video holds)."""
        return VisualLayout(self.per_frame, self.extra, self.crops, self.per_image, 1)


@dataclass(frozen=True)
class PromptVideo:
    """What the prompt needs to know about a video: how many frames and visual tokens, and when."""

    num_frames: int
    visual_tokens: int  # placeholders in the prompt (all frames, newlines included)
    timestamps: tuple[float, ...] = ()  # seconds, one per frame (empty: unknown)
    duration: float | None = None  # the source's length in seconds (None: the last timestamp)
    frame_tokens: tuple[int, ...] = ()  # placeholders of each frame when they differ (the temporal stage)


def time_instruction(video: PromptVideo) -> str:
    """LLaVA-Video's wording for where the sampled frames lie in time."""
    times = ", ".join(f"{t:.2f}s" for t in video.timestamps)
    length = video.duration or (video.timestamps[-1] if video.timestamps else 0.0)
    return (f"The video lasts for {length:.2f} seconds, and {video.num_frames} frames are sampled from it. "
            f"These frames are located at {times}. Please answer the following questions related to this video.\n")


def frame_label(seconds: float) -> str:
    """What precedes each frame's tokens for image models (which have no notion of video time)."""
    return f"frame at {seconds:.1f} s: "


@dataclass
class VisionLanguageModel:
    """A loaded checkpoint (see :func:`~comfy_visionzip.vlm.load_vlm`): the model, its tokenizer, its
    processor settings, and the family module that knows how to use them."""

    model: Any  # the transformers *ForConditionalGeneration
    family: FamilyModule  # the family module (comfy_visionzip.models): all per-family knowledge
    path: str
    config: dict[str, Any]
    tokenizer: Any
    image_config: dict[str, Any]  # image processor settings
    video_config: dict[str, Any] | None  # video processor settings (families with a video path)
    device: torch.device
    dtype: torch.dtype
    quantized: bool = False  # loaded in 8 or 4 bits (bitsandbytes): it cannot be moved between devices
    _encoders: dict[str, Encoder] = field(default_factory=dict, repr=False)
    adapter: Any = None  # a projector adapter in use (comfy_visionzip.adapter.Adapter), else None
    adapter_module: Any = field(default=None, repr=False)  # its projector (a tuned copy of the model's own)
    _adapter_identity: dict[str, Any] | None = field(default=None, repr=False)

    can_answer = True  # it has a language model (a bare tower does not)

    @property
    def inner(self) -> Any:
        """The module holding the towers and the projector (``model.model`` in transformers 5, the model in 4)."""
        inner = getattr(self.model, "model", None)
        return inner if hasattr(inner, "multi_modal_projector") else self.model

    def to(self, device: str | torch.device) -> VisionLanguageModel:
        """Move the model (e.g. to the GPU for a run and back to the CPU after); "auto" picks the best device."""
        target = pick_device(device)
        if target != self.device:
            self.model.to(target)
            if self.adapter_module is not None:
                self.adapter_module.to(target)
            self.device = target
        return self

    @property
    def projector(self) -> Any:
        """The projector compressed visual tokens go through: an adapter's tuned one when one is applied, else the
        model's."""
        return self.adapter_module if self.adapter_module is not None else self.inner.multi_modal_projector

    def projector_for(self, method: str) -> Any:
        """The projector for tokens made with ``method``: full tokens always go through the model's own (an adapter
        is tuned for compressed tokens; at full tokens it could only move the model away from what it was trained
        on: measured on the probe model, bench/results/tune.md), compressed ones through :attr:`projector`."""
        return self.inner.multi_modal_projector if method == "full" else self.projector

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def video_encoder(self) -> Encoder:
        """The encoder video frames go through (the video tower / video preprocessing where the family has one)."""
        if "video" not in self._encoders:
            self._encoders["video"] = self.family.encoder(self)
        return self._encoders["video"]

    def token_identity(self) -> dict[str, Any]:
        """What tokens made with this model depend on: family, width, and the encoder's identity.

        Recorded with every token set (and in tokens files) so that tokens from another model, or from the
        same family with another tower or settings, are refused with what differs.
        """
        return {"family": self.family.model_type, "vision_hidden": self.family.token_width(self),
                **self.video_encoder().identity(), "adapter": self.adapter.id if self.adapter is not None else None}

    def check_tokens(self, video: CompressedVideo) -> None:
        """Refuse tokens this model cannot use, naming what differs."""
        check_compatible(video, self.token_identity(), self.video_encoder().preprocess_spec, self.name)


class ChatView(Protocol):
    """What a family reads of a running chat (see :class:`~comfy_visionzip.answer.Chat`)."""

    family_state: dict[str, Any]  # what the family's chat_state() returned
    kind: str  # "image" or "video": how the video went into the template
    token_id: int  # the placeholder token id
    cache_kwarg: str  # the forward's name for the KV cache (and its output's)

    @property
    def vlm(self) -> VisionLanguageModel: ...

    @property
    def first_prompt_length(self) -> int | None: ...


class FamilyModule:
    """Defaults: LLaVA-1.5 (CLIP tower, second-to-last layer, CLS dropped, one image token per visual token)."""

    model_type = ""  # config.json's model_type
    class_name = ""  # the transformers class
    display = ""  # the name people know
    video_tower = "vision_tower"  # attribute (on the inner model) of the tower video frames go through
    video_input = "image"  # "image": frames go in as images (per-frame placeholders); "video": one video placeholder

    # ---- vision
    def select_strategy(self, vlm: VisionLanguageModel) -> str:
        """What the model keeps of the select layer ("default": drop CLS; "full": every token)."""
        return str(vlm.config.get("vision_feature_select_strategy", "default"))

    def resampler(self, vlm: VisionLanguageModel) -> torch.nn.Module | None:
        """A module the model applies to uncompressed features (used by method "full"); None: it has none."""
        return None

    def preprocess(self, vlm: VisionLanguageModel) -> Preprocess:
        if self.video_input == "video" and vlm.video_config is not None:
            return Preprocess.from_config(vlm.video_config, anyres=False)
        return Preprocess.from_config(vlm.image_config, anyres=True)

    def encoder(self, vlm: VisionLanguageModel) -> Encoder:
        """The encoder video frames go through."""
        tower = getattr(vlm.inner, self.video_tower)
        return VisionEncoder(tower, self.preprocess(vlm),
                             vision_feature_layer=vlm.config.get("vision_feature_layer", -2),
                             select_strategy=self.select_strategy(vlm), resampler=self.resampler(vlm))

    def token_width(self, vlm: VisionLanguageModel) -> int:
        """The width of the tokens this family's encoder makes (what a tokens file must match)."""
        return vlm.video_encoder().width

    # ---- projection and layout
    def arrange(self, vlm: VisionLanguageModel, projected: torch.Tensor, *, method: str, crops: int,
                frame_size: Sequence[int] | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(frames, crops * K, D_text) projected tokens -> (N, D_text) in prompt order; ``keep`` (frames,
        crops * K) leaves out the tokens the temporal stage dropped."""
        if keep is not None:
            return projected[keep.to(projected.device)]
        return projected.reshape(-1, projected.shape[-1])

    def project(self, vlm: VisionLanguageModel, video: CompressedVideo) -> torch.Tensor:
        """(N, D_text): the video's tokens through the model's projector, arranged in prompt order."""
        tokens = video.tokens.to(vlm.device, vlm.dtype)  # (frames, K, D_vision)
        projected = vlm.projector_for(video.method)(tokens)  # (frames, K, D_text)
        return self.arrange(vlm, projected, method=video.method, crops=video.crops,
                            frame_size=video.meta.get("frame_size"), keep=video.keep)

    def layout(self, vlm: VisionLanguageModel, *, method: str, dominant: int, contextual: int,
               frame_size: Sequence[int] | None) -> VisualLayout:
        """The exact placeholder count of frames of (H, W) ``frame_size`` compressed with ``method``.

        Runs the encoder's own compressor and the family's own arranging on zeros (no pixels, no tower
        forward), so it also validates ``dominant`` / ``contextual`` against the tower before any decoding.
        """
        encoder = vlm.video_encoder()
        size = (int(frame_size[0]), int(frame_size[1])) if frame_size else None
        crops = crops_per_frame(encoder.preprocess_spec, size)
        seq = encoder.tokens_per_image
        width = encoder.width
        dtype, device = encoder.dtype, encoder.device
        patches = seq - 1 if encoder.cls_token else seq
        dummy = EncodedImages(torch.zeros(1, seq, width, dtype=dtype, device=device),
                              torch.zeros(1, patches, device=device), torch.zeros(1, seq, 8, device=device),
                              encoder.cls_token, encoder.grid)
        with torch.inference_mode():
            per_image = int(encoder.zip(dummy, dominant, contextual, method).tokens.shape[1])
            one = torch.zeros(1, 1, width, dtype=vlm.dtype, device=vlm.device)
            text_width = int(vlm.projector(one).shape[-1])

            def count(frames: int) -> int:
                zeros = torch.zeros(frames, crops * per_image, text_width, dtype=vlm.dtype, device=vlm.device)
                return int(self.arrange(vlm, zeros, method=method, crops=crops, frame_size=frame_size).shape[0])

            one_frame, two_frames = count(1), count(2)
        return VisualLayout(per_frame=two_frames - one_frame, extra=2 * one_frame - two_frames, crops=crops,
                            per_image=per_image)

    # ---- prompt
    def content_kind(self, video: CompressedVideo) -> str:
        """How the video goes into the template: "image" (per-frame placeholders) or "video"."""
        return self.video_input

    def time_text(self, video: PromptVideo) -> str:
        """Text before the question telling when frames were taken (LLaVA-Video's time instruction)."""
        return time_instruction(video) if self.video_input == "video" else ""

    def placeholder_span(self, token_text: str) -> str:
        """The text of the rendered template that the visual tokens replace."""
        return token_text

    def visual_text(self, token_text: str, kind: str, video: PromptVideo, per_frame: int | None, stamps: bool) -> str:
        """The text replacing the template's placeholder: one ``token_text`` per visual token (``per_frame``
        overrides the count, for fast counting); image-kind frames each with their time label."""
        if kind == "video":
            return token_text * (video.visual_tokens if per_frame is None else per_frame)
        count = video.visual_tokens // max(video.num_frames, 1) if per_frame is None else per_frame
        counts = list(video.frame_tokens) if video.frame_tokens and per_frame is None else [count] * video.num_frames
        parts = []
        for k in range(video.num_frames):
            label = frame_label(video.timestamps[k]) if stamps else ""
            parts.append(label + token_text * counts[k])
        return "\n".join(parts)

    # ---- running the language model
    def chat_state(self, vlm: VisionLanguageModel, video: CompressedVideo) -> dict[str, Any]:
        """What a chat about ``video`` keeps besides the projected tokens (positions, DeepStack); LLaVA: nothing."""
        return {}

    def run(self, chat: ChatView, emb: torch.Tensor, ids: list[int], start: int,
            cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Run ids[start:] (embedded as ``emb``) through the model; returns (last logits, cache)."""
        out = chat.vlm.model(inputs_embeds=emb, **cache_kwargs)
        return out.logits[0, -1].float(), getattr(out, chat.cache_kwarg)
