"""Qwen2.5-VL / Qwen3-VL processing: frames to the pixel rows the vision tower takes, as the model's
processor makes them (dynamic resolution in multiples of patch x merge, two frames per temporal patch,
an odd last frame repeated, patch rows grouped by 2x2 merge group), and the time of each temporal patch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import VisionZipError
from ..preprocess import (
    DECODE_MARGIN,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DynamicResolution,
    Preprocess,
    as_uint8_frames,
    resize_bicubic,
    rgb_triple,
)

VIDEO_TOKENS_PER_FRAME = 768  # the Qwen team's default cap for video frames (qwen-vl-utils), in merged tokens


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen processors' resize rule: both sides multiples of ``factor``, the area within the limits."""
    if max(height, width) / max(min(height, width), 1) > 200:
        raise VisionZipError(f"a {width}x{height} frame is too elongated for Qwen (aspect ratio above 200)")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_preprocess(config: dict[str, Any], *, video: bool) -> Preprocess:
    """The Preprocess of a Qwen processor config (min/max pixels, patch, merge, temporal patch)."""
    size = config.get("size") or {}
    patch = int(config.get("patch_size", 14))
    merge = int(config.get("merge_size", 2))
    factor = patch * merge
    least = int(config.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    most = int(config.get("max_pixels") or size.get("longest_edge") or factor * factor * 1280)
    if video:
        most = min(most, VIDEO_TOKENS_PER_FRAME * factor * factor)
    if not (1 <= patch <= 64 and 1 <= merge <= 8 and 0 < least <= most):
        raise VisionZipError(f"the processor config's sizes do not fit together (patch {patch}, merge {merge}, "
                             f"min_pixels {least}, max_pixels {most}): fix preprocessor_config.json")
    mean = rgb_triple(config.get("image_mean") or OPENAI_CLIP_MEAN)
    std = rgb_triple(config.get("image_std") or OPENAI_CLIP_STD)
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    dynamic = DynamicResolution(factor=factor, min_pixels=least, max_pixels=most, patch=patch,
                                temporal=int(config.get("temporal_patch_size", 2)))
    return Preprocess(mean=mean, std=std, rescale=rescale, dynamic=dynamic)


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(units * temporal, 3, H, W) normalised frames -> (units * H/patch * W/patch, 3 * temporal * patch * patch)
    rows in the processors' order (merge groups of 2x2 patches together, raster order of the groups)."""
    frames, channels, height, width = pixels.shape
    gh, gw = height // patch, width // patch
    x = pixels.reshape(frames // temporal, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (units, gh/m, gw/m, m, m, C, T, p, p)
    return x.reshape(-1, channels * temporal * patch * patch)


class QwenProcessor:
    """Sizes, pixel rows and per-temporal-patch times for one Qwen checkpoint's processor settings."""

    def __init__(self, spec: Preprocess, merge: int) -> None:
        if spec.dynamic is None:
            raise VisionZipError("a Qwen processor needs dynamic-resolution settings (min/max pixels, patch, merge)")
        self.spec = spec
        self.dynamic = spec.dynamic
        self.merge = merge
        self.temporal = spec.dynamic.temporal
        self.patch = spec.dynamic.patch

    # ---- sizes
    def size_for(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) the processor resizes a frame of (H, W) to."""
        height, width = (int(v) for v in frame_size)
        d = self.dynamic
        return smart_resize(height, width, d.factor, d.min_pixels, d.max_pixels)

    def grid_for(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of merged tokens for frames of (H, W)."""
        height, width = self.size_for(frame_size)
        return height // self.dynamic.factor, width // self.dynamic.factor

    def tokens_for(self, frame_size: tuple[int, int]) -> int:
        rows, cols = self.grid_for(frame_size)
        return rows * cols

    @property
    def largest_tokens(self) -> int:
        """Merged tokens of the largest frame the settings allow (a square at max_pixels)."""
        side = int(math.isqrt(self.dynamic.max_pixels))
        return self.tokens_for((side, side))

    def decode_cover(self, margin: float = DECODE_MARGIN) -> tuple[int, int]:
        side = math.ceil(math.sqrt(self.dynamic.max_pixels) * margin)
        return side, side

    # ---- pixels
    def resized(self, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 [T, H, W, 3] (or 0..1 IMAGE) -> float (T, 3, h, w) 0..255 at the size the processor picks."""
        frames = as_uint8_frames(frames)
        height, width = self.size_for((int(frames.shape[1]), int(frames.shape[2])))
        x = frames.to(device).permute(0, 3, 1, 2).float()
        return resize_bicubic(x, height, width)

    def pixels(self, frames: torch.Tensor, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (pixel rows, grid_thw (units, 3)) as the model's processor makes them: resized to
        multiples of patch x merge, normalised, an odd last frame repeated, two frames per temporal patch."""
        x = self.resized(frames, device)
        if x.shape[0] % self.temporal:
            x = torch.cat([x, x[-1:].expand(self.temporal - x.shape[0] % self.temporal, -1, -1, -1)])
        spec = self.spec
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        x = (x * spec.rescale - mean) / std
        rows = patchify(x, self.patch, self.merge, self.temporal)
        units = x.shape[0] // self.temporal
        grid = torch.tensor([[1, x.shape[2] // self.patch, x.shape[3] // self.patch]] * units)
        return rows.to(dtype), grid

    def view(self, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (units, h, w, 3): the first frame of each temporal patch, at the size the model sees it."""
        x = self.resized(frames, device)[:: self.temporal]
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()

    def units(self, times: list[float], indices: list[int]) -> tuple[list[float], list[int]]:
        """Per temporal patch: the mean time of its frames (as Qwen3-VL's processor computes it) and its first frame."""
        if not times and not indices:
            return [], []
        step = self.temporal
        pad = (-len(indices)) % step
        times = list(times) + [times[-1]] * pad if times else []
        indices = list(indices) + [indices[-1]] * pad
        unit_times = [sum(times[i: i + step]) / step for i in range(0, len(times), step)] if times else []
        return unit_times, indices[::step]
