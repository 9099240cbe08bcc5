"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): a full-attention ViT with learned + rotary positions,
a 2x2 merger, DeepStack (features of a few intermediate vision blocks, each through its own merger,
added to the hidden states of the first language-model layers at the visual positions), and
``<t seconds>`` text before every temporal patch (the mean time of its two frames).

The DeepStack features of every merged token ride in the same token rows as the main features, so the
VisionZip selection and merge that make the kept tokens make their DeepStack features too: exactly the
kept tokens get them. Scores come from the last vision block.
"""

from typing import Any

import torch

from ._qwen import QwenFamily
from .base import ChatView


class Qwen3_VL(QwenFamily):
    model_type = "qwen3_vl"
    class_name = "Qwen3VLForConditionalGeneration"
    display = "Qwen3-VL"
    timestamp_text = True

    def run(self, chat: ChatView, emb: torch.Tensor, ids: list[int], start: int,
            cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """The language model with the kept tokens' DeepStack features, then the LM head on the last position."""
        position_ids = self.positions(chat, ids)[:, start:].unsqueeze(1).to(emb.device)
        state = chat.family_state
        part = torch.tensor(ids[start:], device=emb.device)
        mask = part == chat.token_id
        kwargs = {k: v for k, v in cache_kwargs.items() if k not in ("logits_to_keep", "num_logits_to_keep")}
        if mask.any() and state["deepstack"]:
            first = sum(1 for i in ids[:start] if i == chat.token_id)
            count = int(mask.sum())
            kwargs["visual_pos_masks"] = mask[None]
            kwargs["deepstack_visual_embeds"] = [d[first: first + count].to(emb.dtype) for d in state["deepstack"]]
        out = self.language_model(chat.vlm)(inputs_embeds=emb, position_ids=position_ids, **kwargs)
        logits = chat.vlm.model.lm_head(out.last_hidden_state[:, -1])
        cache = getattr(out, chat.cache_kwarg, None)
        return logits[0].float(), cache if cache is not None else out.past_key_values
