"""Pixels for a vision tower, made the way the checkpoint's own image processor makes them.

Shortest-edge resize + centre crop (CLIP), square resize (SigLIP / OneVision), and LLaVA-NeXT /
OneVision "anyres" crops (the whole frame squashed to a square, then the tiles of the best grid), in
batched torch on the model's device. The bicubic resize is the one transformers' torchvision backend
uses (bit-exact with it on the CPU). Qwen's dynamic resolution lives with its family
(:mod:`comfy_visionzip.models.qwen_processing`); its settings ride in :attr:`Preprocess.dynamic`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import VisionZipError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# frames are decoded at this much more than the encoder's input size (then resized exactly as the processor does)
DECODE_MARGIN = 1.25


@dataclass(frozen=True)
class DynamicResolution:
    """Qwen's dynamic resolution: frames resized to multiples of ``factor`` with an area in the limits."""

    factor: int  # patch x merge: both sides are multiples of it
    min_pixels: int
    max_pixels: int
    patch: int  # the tower's patch side
    temporal: int  # frames per temporal patch


@dataclass(frozen=True)
class Preprocess:
    """How a checkpoint turns an RGB image into pixel values (read from its processor config)."""

    shortest_edge: int | None = None  # resize so the shorter side is this long (CLIP) ...
    resize_hw: tuple[int, int] | None = None  # ... or to exactly (height, width) (SigLIP / OneVision)
    crop_hw: tuple[int, int] | None = None  # centre crop after the resize (None: no crop)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale: float = 1 / 255
    pinpoints: tuple[tuple[int, int], ...] | None = None  # anyres grid resolutions (height, width)
    dynamic: DynamicResolution | None = None  # Qwen: sizes chosen per video (then size/crop are unused)

    @property
    def tile(self) -> int:
        """Side of the square image the tower sees."""
        if self.crop_hw is not None:
            return self.crop_hw[0]
        if self.resize_hw is not None:
            return self.resize_hw[0]
        return int(self.shortest_edge or 0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | object, *, anyres: bool = True) -> Preprocess:
        """From an image/video processor config (``preprocessor_config.json`` keys or processor attributes)."""

        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        size = get("size")
        if hasattr(size, "items") and not isinstance(size, dict):
            size = {k: v for k, v in size.items() if v is not None}  # transformers SizeDict
        shortest = resize_hw = None
        if isinstance(size, dict):
            if size.get("shortest_edge"):
                shortest = int(size["shortest_edge"])
            elif size.get("height") and size.get("width"):
                resize_hw = (int(size["height"]), int(size["width"]))
        elif isinstance(size, int):
            shortest = size
        if shortest is None and resize_hw is None:
            raise VisionZipError(f"the processor config has no usable 'size' ({size!r})")
        crop = get("crop_size")
        if hasattr(crop, "items") and not isinstance(crop, dict):
            crop = {k: v for k, v in crop.items() if v is not None}
        crop_hw = None
        if get("do_center_crop", crop is not None) and crop:
            crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        mean = rgb_triple(get("image_mean") or OPENAI_CLIP_MEAN)
        std = rgb_triple(get("image_std") or OPENAI_CLIP_STD)
        rescale = float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0
        pinpoints = get("image_grid_pinpoints") if anyres else None
        pins = tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else None
        return cls(shortest, resize_hw, crop_hw, mean, std, rescale, pins)

    def describe(self) -> str:
        """A short description for messages ("336x336 anyres", "3136..1003520 pixels in multiples of 28")."""
        if self.dynamic is not None:
            d = self.dynamic
            return f"{d.min_pixels}..{d.max_pixels} pixels in multiples of {d.factor}"
        size = self.crop_hw or self.resize_hw or (self.shortest_edge, self.shortest_edge)
        return f"{size[0]}x{size[1]}{' anyres' if self.pinpoints else ''}"


def rgb_triple(values: Sequence[float]) -> tuple[float, float, float]:
    """An RGB triple (image mean / std) from a processor config."""
    if len(values) != 3:
        raise VisionZipError(f"expected 3 values (R, G, B), got {list(values)!r}")
    return float(values[0]), float(values[1]), float(values[2])


def resize_bicubic(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, H, W) float 0..255 (integral values) -> (N, C, height, width), antialiased bicubic, 0..255 integral.

    Done the way transformers' torchvision backend (the one ComfyUI installs) does it: on the CPU the
    uint8 kernel (bit-exact with it), elsewhere one float pass then clamp and round (as it does on GPU).
    """
    if x.shape[-2:] == (height, width):
        return x
    if x.device.type == "cpu":
        small = x.round().clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
        out = F.interpolate(small, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return out.float().contiguous()
    out = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 255).round_()


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(edge * long / short)
    return (edge, new_long) if height <= width else (new_long, edge)


def _center_crop(x: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    if height < crop_h or width < crop_w:  # the processor pads small images with zeros first
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = x.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top: top + crop_h, left: left + crop_w]


def select_best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The anyres grid resolution (h, w) keeping the most of the image and wasting the least (LLaVA-NeXT)."""
    best, best_effective, best_waste = None, 0, math.inf
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = target_h * target_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (target_h, target_w), effective, waste
    if best is None:
        raise VisionZipError("no anyres grid resolutions (image_grid_pinpoints) to choose from")
    return best


def _fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def preprocess_frames(
    frames: torch.Tensor,
    spec: Preprocess,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
) -> torch.Tensor:
    """uint8 [T, H, W, 3] frames (all the same size) -> pixel values.

    Returns (T, 3, S, S), or (T, 1 + tiles, 3, S, S) with anyres (the resized whole image first, then
    the grid tiles row by row), normalised as the checkpoint's processor does (``normalize=False``:
    the 0..255 pixels the model looks at, for previews).
    """
    frames = as_uint8_frames(frames)
    x = frames.to(device=device).permute(0, 3, 1, 2).float()  # (T, 3, H, W), 0..255
    height, width = x.shape[-2:]
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)

    def finish(tiles: torch.Tensor) -> torch.Tensor:  # per-tile resize/crop (no-ops on square tiles), normalise
        if spec.shortest_edge is not None:
            h, w = _shortest_edge_size(tiles.shape[-2], tiles.shape[-1], spec.shortest_edge)
            tiles = resize_bicubic(tiles, h, w)
        elif spec.resize_hw is not None:
            tiles = resize_bicubic(tiles, *spec.resize_hw)
        if spec.crop_hw is not None:
            tiles = _center_crop(tiles, *spec.crop_hw)
        if not normalize:
            return tiles.to(dtype)
        return ((tiles * spec.rescale - mean) / std).to(dtype)

    if not spec.pinpoints:
        return finish(x)

    tile = spec.tile
    target_h, target_w = select_best_resolution(height, width, spec.pinpoints)
    new_h, new_w = _fit_size(height, width, target_h, target_w)
    grid = resize_bicubic(x, new_h, new_w)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    grid = F.pad(grid, (left, target_w - new_w - left, top, target_h - new_h - top))  # black, before normalising
    rows, cols = target_h // tile, target_w // tile
    tiles = grid.reshape(-1, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)  # (T, rows, cols, 3, S, S)
    tiles = tiles.reshape(-1, rows * cols, 3, tile, tile)
    base_hw = spec.resize_hw or (int(spec.shortest_edge or tile), int(spec.shortest_edge or tile))
    base = resize_bicubic(x, *base_hw)[:, None]  # (T, 1, 3, S, S): the whole image, squashed to a square
    both = torch.cat([base, tiles], dim=1)  # (T, 1 + tiles, 3, S, S)
    out = finish(both.flatten(0, 1))
    return out.view(both.shape[0], both.shape[1], *out.shape[1:])


def model_view(frames: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """uint8 (T, S, S, 3): the whole-frame image a model with ``spec`` sees (resized / cropped, not normalised)."""
    if spec.pinpoints:  # anyres: the first crop is the whole frame squashed to a square
        spec = Preprocess(resize_hw=(spec.tile, spec.tile), mean=spec.mean, std=spec.std)
    pixels = preprocess_frames(frames, spec, device="cpu", normalize=False)
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()



def crops_per_frame(spec: Preprocess, frame_size: tuple[int, int] | None) -> int:
    """Images per frame: 1, or with anyres 1 + the tiles of the grid chosen for a frame of (H, W)."""
    if not spec.pinpoints:
        return 1
    if not frame_size:
        raise VisionZipError("an anyres model needs the frame size to count its tiles")
    height, width = frame_size
    rows, cols = (side // spec.tile for side in select_best_resolution(int(height), int(width), spec.pinpoints))
    return 1 + rows * cols


def as_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] frames as they are; a ComfyUI IMAGE (float 0..1) converted; anything else refused."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        got = f"shape {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else f"a {type(frames).__name__}"
        raise VisionZipError(f"frames must be [T, H, W, 3] RGB (a tensor), got {got}")
    if 0 in frames.shape:
        raise VisionZipError(f"no frames to encode (an empty batch of shape {tuple(frames.shape)})")
    if frames.dtype == torch.uint8:
        return frames
    if frames.is_floating_point():  # a ComfyUI IMAGE: float 0..1
        if not bool(torch.isfinite(frames).all()):
            raise VisionZipError("the frames hold NaN or infinite values")
        if float(frames.max()) > 1.5 or float(frames.min()) < -0.5:  # 0..255 given as floats: not a 0..1 IMAGE
            raise VisionZipError(f"float frames must be 0..1 (a ComfyUI IMAGE); these reach {float(frames.max()):g}: "
                                 "give uint8 0..255 frames, or divide by 255")
        return (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    raise VisionZipError(f"frames must be uint8 0..255 or float 0..1, got {frames.dtype}")
