"""The one small interface every model family implements (LLaVA-1.5's behaviour is the default).

A family module says, for one transformers class: which tower frames go through and how they are
preprocessed (select layer, feature strategy, an optional resampler), how projected tokens are
arranged in the prompt (pooling, anyres packing, newline tokens), and which placeholder the chat
template expects. Shared code asks the family; it never branches on ``model_type``.
"""

from __future__ import annotations

import torch

from ..encoder import Preprocess, VisionEncoder


class FamilyModule:
    """Defaults: LLaVA-1.5 (CLIP tower, second-to-last layer, CLS dropped, one image token per visual token)."""

    model_type = ""  # config.json's model_type
    class_name = ""  # the transformers class
    display = ""  # the name people know
    video_tower = "vision_tower"  # attribute (on the inner model) of the tower video frames go through
    video_input = "image"  # "image": frames go in as images (per-frame placeholders); "video": one video placeholder

    def select_strategy(self, vlm) -> str:
        """What the model keeps of the select layer ("default": drop CLS; "full": every token)."""
        return vlm.config.get("vision_feature_select_strategy", "default")

    def resampler(self, vlm) -> torch.nn.Module | None:
        """A module the model applies to uncompressed features (used by method "full"), if any."""
        return None

    def preprocess(self, vlm) -> Preprocess:
        if self.video_input == "video" and vlm.video_config is not None:
            return Preprocess.from_config(vlm.video_config, anyres=False)
        return Preprocess.from_config(vlm.image_config, anyres=True)

    def encoder(self, vlm) -> VisionEncoder:
        """The encoder video frames go through."""
        tower = getattr(vlm.inner, self.video_tower)
        return VisionEncoder(tower, self.preprocess(vlm), vision_feature_layer=vlm.config.get("vision_feature_layer", -2),
                             select_strategy=self.select_strategy(vlm), resampler=self.resampler(vlm))

    def arrange(self, vlm, projected: torch.Tensor, *, method: str, crops: int, frame_size,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """(frames, crops * K, D_text) projected tokens -> (N, D_text) in prompt order; ``keep`` (frames,
        crops * K) leaves out the tokens the temporal stage dropped."""
        if keep is not None:
            return projected[keep.to(projected.device)]
        return projected.reshape(-1, projected.shape[-1])

    def token_width(self, vlm) -> int:
        """The width of the tokens this family's encoder makes (what a tokens file must match)."""
        return int(vlm.video_encoder().tower.config.hidden_size)

    def project(self, vlm, video) -> torch.Tensor:
        """(N, D_text): the video's tokens through the model's projector, arranged in prompt order."""
        tokens = video.tokens.to(vlm.device, vlm.dtype)  # (frames, K, D_vision)
        projected = vlm.inner.multi_modal_projector(tokens)  # (frames, K, D_text)
        return self.arrange(vlm, projected, method=video.method, crops=video.crops, frame_size=video.meta.get("frame_size"),
                            keep=video.keep)

    def layout(self, vlm, *, method: str, dominant: int, contextual: int, frame_size):
        """A VisualLayout computed by the family itself, or None (then counted by arranging zeros)."""
        return None

    def content_kind(self, video) -> str:
        """How the video goes into the template: "image" (per-frame placeholders) or "video"."""
        return self.video_input

    def time_text(self, video) -> str:
        """Text before the question telling when frames were taken (LLaVA-Video's time instruction)."""
        from ..prompt import time_instruction

        return time_instruction(video) if self.video_input == "video" else ""

    def placeholder_span(self, token_text: str) -> str:
        """The text of the rendered template that the visual tokens replace."""
        return token_text

    def visual_text(self, builder, video, per_frame, stamps) -> str | None:
        """The text replacing the template's placeholder, or None for the default expansion."""
        return None

    def chat_state(self, vlm, video):
        """What a chat about ``video`` keeps besides the projected tokens (positions, DeepStack), or None."""
        return None

    def run(self, chat, emb: torch.Tensor, ids: list[int], start: int, cache_kwargs: dict):
        """Run ids[start:] (embedded as ``emb``) through the model; returns (last logits, cache)."""
        out = chat.vlm.model(inputs_embeds=emb, **cache_kwargs)
        return out.logits[0, -1].float(), getattr(out, chat.cache_kwarg)


class BareTower(FamilyModule):
    """What a bare vision tower (no language model) answers to where a family is asked."""

    model_type = "vision_tower"
    display = "vision tower"
    video_tower = ""
