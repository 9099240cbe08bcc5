"""Pictures for people: contact sheets of sampled frames (heatmaps and kept-token overlays come later)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch


def contact_sheet(
    frames: torch.Tensor | np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    tile_width: int = 240,
) -> np.ndarray:
    """Tile frames (uint8 [T, H, W, 3]) into one RGB uint8 image, each with its label underneath."""
    from PIL import Image, ImageDraw

    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames must be a non-empty [T, H, W, 3] batch, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    count, height, width = arr.shape[:3]
    columns = columns or min(count, max(1, math.ceil(math.sqrt(count * 1.5))))
    rows = math.ceil(count / columns)
    tile_h = max(1, round(height * tile_width / width))
    label_h = 16 if labels else 0
    sheet = Image.new("RGB", (columns * tile_width, rows * (tile_h + label_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k in range(count):
        x, y = (k % columns) * tile_width, (k // columns) * (tile_h + label_h)
        sheet.paste(Image.fromarray(arr[k]).resize((tile_width, tile_h), Image.BILINEAR), (x, y))
        if labels:
            draw.text((x + 4, y + tile_h + 2), str(labels[k]), fill=(230, 230, 230))
    return np.asarray(sheet)


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> str:
    from PIL import Image

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path
