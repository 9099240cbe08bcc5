"""What every vision encoder is and what it gives: the :class:`Encoder` interface and :class:`EncodedImages`.

Two encoders implement it: :class:`~comfy_visionzip.encoder.VisionEncoder` (CLIP, SigLIP, DINOv2: one
image per frame, or anyres crops) and :class:`~comfy_visionzip.models.qwen_vision.QwenEncoder` (Qwen's
dynamic-resolution towers: one temporal patch per two frames, merged tokens). Shared code (the
streaming pipeline, the planner, the nodes) uses only these members, so it never asks what an encoder is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .preprocess import DECODE_MARGIN, Preprocess
from .zip import ZipResult


@dataclass
class EncodedImages:
    """Select-layer outputs of N images (frames, crops of frames, or temporal patches)."""

    hidden: torch.Tensor  # (N, S, D): the select layer's output, CLS first when there is one
    scores: torch.Tensor  # (N, S-1) CLS attention to each patch (summed over heads), or (N, S) received
    keys: torch.Tensor  # (N, S, head_dim): the select layer's keys averaged over heads (float32)
    cls_token: bool
    grid: tuple[int, int]  # patch rows, cols
    crops: int = 1  # images per frame (anyres: the whole image + grid tiles)
    timestamps: list[float] = field(default_factory=list)  # per frame, when known
    indices: list[int] = field(default_factory=list)  # per frame
    views: torch.Tensor | None = None  # uint8 (frames, S, S, 3): what the model saw of each frame (previews)
    encoder: Encoder | None = None  # the encoder that made them (compressing needs its settings)
    meta: dict[str, Any] = field(default_factory=dict)  # the model that made them, the frame size

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def num_frames(self) -> int:
        return len(self) // self.crops

    @classmethod
    def concat(cls, parts: list[EncodedImages]) -> EncodedImages:
        """Batches of one encoder's outputs, one after the other (the first's settings)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        return cls(torch.cat([p.hidden for p in parts]), torch.cat([p.scores for p in parts]),
                   torch.cat([p.keys for p in parts]), first.cls_token, first.grid, first.crops)


@runtime_checkable
class Encoder(Protocol):
    """A vision tower with its preprocessing, run to its score layer, giving tokens, scores and keys."""

    tower: torch.nn.Module  # the transformers vision model (its config is the tower's identity)
    preprocess_spec: Preprocess  # how frames become pixels
    cls_token: bool  # whether the tokens start with a CLS token
    grid: tuple[int, int]  # patch rows, cols of every image ((0, 0): per video, see patch_grid)
    layer_index: int  # the layer scores and tokens come from
    num_layers: int
    select_strategy: str  # "default" (CLS dropped before projecting) or "full"
    frames_per_unit: int  # sampled frames per encoded image (Qwen: 2 per temporal patch)
    width: int  # the width of the main features in a token row (Qwen3-VL's DeepStack features follow them)

    @property
    def device(self) -> torch.device:
        """Where the tower's weights are (implementations that subclass Encoder inherit this)."""
        return next(self.tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    @property
    def tokens_per_image(self) -> int:
        """Tokens of one encoded image before compression (the largest image, for dynamic resolution)."""
        ...

    def decode_cover(self, margin: float = DECODE_MARGIN) -> tuple[int, int]:
        """(height, width) a decoded frame must still cover for the preprocessing to lose nothing."""
        ...

    def encode(self, frames: torch.Tensor, *, batch_size: int = 8) -> EncodedImages:
        """uint8 [T, H, W, 3] frames (or a float 0..1 IMAGE) -> select-layer outputs of every encoded image."""
        ...

    def zip(self, encoded: EncodedImages, dominant: int, contextual: int, method: str = "visionzip") -> ZipResult:
        """Compress encoded images (``full``: exactly what the model itself would project)."""
        ...

    def view(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (images, h, w, 3): what the model sees of each encoded image (previews)."""
        ...

    def patch_grid(self, frames: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the tokens of these frames."""
        ...

    def attention_from(self, frames: torch.Tensor, point: tuple[float, float]) -> tuple[torch.Tensor, int]:
        """The score layer's attention from the token at (x, y) to every token: ((images, tokens), its index)."""
        ...

    def units(self, times: list[float], indices: list[int]) -> tuple[list[float], list[int]]:
        """Times and frame numbers per encoded image from those of the sampled frames."""
        ...

    def frame_bytes(self) -> int:
        """About how many bytes of device memory encoding one sampled frame takes (sizes batches)."""
        ...

    def identity(self) -> dict[str, Any]:
        """What tokens made by this encoder depend on: tower config digest, select layer, grid, strategy."""
        ...
