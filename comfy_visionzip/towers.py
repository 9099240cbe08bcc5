"""Tower adapters: where a ViT-style vision tower keeps what the encoder reads.

The encoder needs, for one layer of the tower: the block itself (to stop after it and read its
output), its query and key projections (hooked, never re-run), the number of heads, whether token 0
is a CLS token, and how many register tokens follow it (DINOv2 with registers). Each architecture
states that once here; the encoder asks :func:`tower_parts` and never guesses attribute names.

Token layout every adapter describes: ``[CLS?] [registers...] [patches...]``. Registers take part in
attention (they are keys the CLS row attends to) but are never patches and never kept tokens: the
encoder drops them from the hidden states, keys and scores it returns.

Adding an architecture (Qwen-VL's ViT, InternViT) means adding one function and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import VisionZipError


@dataclass(frozen=True)
class TowerParts:
    """The pieces of one tower the encoder uses (modules are the tower's own, not copies)."""

    architecture: str  # the adapter that described it
    layers: tuple[torch.nn.Module, ...]  # transformer blocks in order
    queries: tuple[torch.nn.Module, ...]  # per block: the module whose output is the query projection
    keys: tuple[torch.nn.Module, ...]  # per block: the key projection
    num_heads: int
    head_dim: int
    patch_size: int
    image_size: int  # the size the tower was configured for (position table)
    cls_token: bool  # token 0 is a CLS token
    registers: int = 0  # register tokens right after CLS

    @property
    def prefix(self) -> int:
        """Tokens before the first patch."""
        return (1 if self.cls_token else 0) + self.registers


def _config(tower: torch.nn.Module) -> Any:
    config = getattr(tower, "config", None)
    if config is None:
        raise VisionZipError(f"{type(tower).__name__} has no config: not a transformers vision tower")
    return config


def _heads(config: Any) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    return heads, int(config.hidden_size) // heads


def _clip_like(tower: torch.nn.Module, name: str) -> TowerParts:
    """CLIP and SigLIP (and their LLaVA uses): ``[vision_model.]encoder.layers[i].self_attn.{q,k}_proj``."""
    inner: Any = getattr(tower, "vision_model", tower)  # the *VisionModel wraps the *VisionTransformer
    layers = tuple(inner.encoder.layers)
    config = _config(tower)
    heads, head_dim = _heads(config)
    cls = getattr(getattr(inner, "embeddings", None), "class_embedding", None) is not None
    return TowerParts(name, layers, tuple(layer.self_attn.q_proj for layer in layers),
                      tuple(layer.self_attn.k_proj for layer in layers), heads, head_dim, int(config.patch_size),
                      int(config.image_size), cls_token=cls)


def _dinov2(tower: Any, name: str) -> TowerParts:
    """DINOv2 (and with registers): ``encoder.layer[i].attention``: transformers 5.x ``.q_proj/.k_proj``,
    4.x ``.attention.query/.key``. CLS first, then ``num_register_tokens`` registers."""
    layers = tuple(tower.encoder.layer)
    config = _config(tower)
    heads, head_dim = _heads(config)

    def projection(layer: Any, new: str, old: str) -> torch.nn.Module:
        attention = layer.attention
        if hasattr(attention, new):
            return getattr(attention, new)
        return getattr(attention.attention, old)  # transformers 4.x: Dinov2Attention.attention (Dinov2SelfAttention)

    return TowerParts(name, layers, tuple(projection(layer, "q_proj", "query") for layer in layers),
                      tuple(projection(layer, "k_proj", "key") for layer in layers), heads, head_dim,
                      int(config.patch_size), int(config.image_size), cls_token=True,
                      registers=int(getattr(config, "num_register_tokens", 0) or 0))


# class name (or a base class's name) -> adapter
ADAPTERS: dict[str, Callable[[torch.nn.Module, str], TowerParts]] = {
    "CLIPVisionModel": _clip_like,
    "CLIPVisionTransformer": _clip_like,
    "SiglipVisionModel": _clip_like,
    "SiglipVisionTransformer": _clip_like,
    "Dinov2Model": _dinov2,
    "Dinov2WithRegistersModel": _dinov2,
}


def tower_parts(tower: torch.nn.Module) -> TowerParts:
    """The parts of ``tower`` the encoder reads; an unknown tower is a clear error naming what was found."""
    for cls in type(tower).__mro__:
        adapter = ADAPTERS.get(cls.__name__)
        if adapter is not None:
            try:
                return adapter(tower, cls.__name__)
            except AttributeError as e:
                raise VisionZipError(f"{type(tower).__name__} looks like {cls.__name__} but its layout differs "
                                     f"({e}); this transformers version may be outside the supported range") from e
    found = ", ".join(name for name, _ in tower.named_children()) or "no submodules"
    raise VisionZipError(f"{type(tower).__name__} is not a supported vision tower (it holds: {found}); "
                         f"supported: {', '.join(ADAPTERS)}")
