"""A bare vision tower (no language model) standing where a loaded VLM does: for encoding, compressing
and previews (benches, heatmaps, the real DINOv2 tower). It cannot answer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..devices import pick_device
from ..encoder import VisionEncoder
from ..tokens import CompressedVideo, check_compatible
from .base import FamilyModule


class BareTower(FamilyModule):
    """What a bare vision tower answers to where a family is asked."""

    model_type = "vision_tower"
    display = "vision tower"
    video_tower = ""


@dataclass
class VisionTower:
    """A bare vision tower and where it came from. ``real`` says whether it carries pretrained weights we know of."""

    encoder: VisionEncoder
    path: str
    real: bool = False
    family: FamilyModule = field(default_factory=BareTower)

    can_answer = False  # no language model
    quantized = False

    @property
    def model(self) -> torch.nn.Module:
        return self.encoder.tower

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def to(self, device: str | torch.device) -> VisionTower:
        self.encoder.tower.to(pick_device(device))
        return self

    def video_encoder(self) -> VisionEncoder:
        return self.encoder

    def token_identity(self) -> dict[str, Any]:
        return {"family": self.family.model_type, "vision_hidden": self.encoder.width, **self.encoder.identity()}

    def check_tokens(self, video: CompressedVideo) -> None:
        check_compatible(video, self.token_identity(), self.encoder.preprocess_spec, self.name)
