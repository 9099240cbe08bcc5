"""The vision encoder with attention: preprocessing, a forward pass that stops at the select layer,
and the select layer's CLS attention row (or attention received) and head-averaged keys.

How the scores are read without slowing the tower down:
  - the tower keeps its fast attention (SDPA); nothing asks it for attention maps;
  - forward hooks on *one* model instance capture the select layer's query and key projections
    (outputs of ``q_proj`` / ``k_proj``; no extra matmul) and its output, then stop the forward
    (the remaining layers never run: LLaVA reads the second-to-last layer);
  - with a CLS token only the CLS row of softmax(q k^T) is computed ((B, heads, S) numbers); without
    one (SigLIP) the attention each token receives is accumulated over query chunks, never S x S for
    all heads of a whole batch at once;
  - the hooks are removed in ``finally``; nothing is patched on any class.

Preprocessing reproduces the checkpoint's image processor (shortest-edge resize + centre crop for CLIP;
square resize; LLaVA-NeXT / OneVision "anyres" crops) in batched torch on the model's device. The
bicubic resize is done in two passes with rounding to 0..255 in between, as PIL does, which keeps pixel values within a couple of uint8 steps of the processor on any device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import VisionZipError
from .stream import prefetch
from .towers import tower_parts
from .zip import METHODS, ZipResult, compress, token_cells

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# frames are decoded at this much more than the encoder's input size (then resized exactly as the processor does)
DECODE_MARGIN = 1.25


# ------------------------------------------------------------------------------------- preprocessing


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
    # dynamic resolution (Qwen): (patch x merge factor, min pixels, max pixels, patch, temporal patch)
    pixels: tuple[int, int, int, int, int] | None = None

    @property
    def tile(self) -> int:
        """Side of the square image the tower sees."""
        if self.crop_hw is not None:
            return self.crop_hw[0]
        if self.resize_hw is not None:
            return self.resize_hw[0]
        return int(self.shortest_edge or 0)

    @classmethod
    def from_config(cls, config: dict, *, anyres: bool = True) -> Preprocess:
        """From an image/video processor config (``preprocessor_config.json`` keys or processor attributes)."""

        def get(key, default=None):
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
        mean = tuple(float(v) for v in (get("image_mean") or OPENAI_CLIP_MEAN))
        std = tuple(float(v) for v in (get("image_std") or OPENAI_CLIP_STD))
        rescale = float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0
        pinpoints = get("image_grid_pinpoints") if anyres else None
        pins = tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else None
        return cls(shortest, resize_hw, crop_hw, mean, std, rescale, pins)


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
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise VisionZipError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        if frames.is_floating_point():  # a ComfyUI IMAGE: float 0..1
            frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
        else:
            raise VisionZipError(f"frames must be uint8 0..255 or float 0..1, got {frames.dtype}")
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
    base_hw = spec.resize_hw or (spec.shortest_edge, spec.shortest_edge)
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


# ----------------------------------------------------------------------------------- the encoder


class _StopTower(Exception):
    """Raised by our hook after the select layer: the rest of the tower is not needed."""


@dataclass
class EncodedImages:
    """Select-layer outputs of N images (frames, or crops of frames)."""

    hidden: torch.Tensor  # (N, S, D): the select layer's output, CLS first when there is one
    scores: torch.Tensor  # (N, S-1) CLS attention to each patch (summed over heads), or (N, S) received
    keys: torch.Tensor  # (N, S, head_dim): the select layer's keys averaged over heads (float32)
    cls_token: bool
    grid: tuple[int, int]  # patch rows, cols
    crops: int = 1  # images per frame (anyres: the whole image + grid tiles)
    timestamps: list[float] = field(default_factory=list)  # per frame, when known
    indices: list[int] = field(default_factory=list)  # per frame
    views: torch.Tensor | None = None  # uint8 (frames, S, S, 3): what the model saw of each frame (previews)
    encoder: VisionEncoder | None = None  # the encoder that made them (compressing needs its settings)
    meta: dict = field(default_factory=dict)  # the model that made them

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def num_frames(self) -> int:
        return len(self) // self.crops


def select_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """transformers' ``hidden_states[k]`` is the output of layer k-1 (index 0 = embeddings)."""
    if isinstance(vision_feature_layer, (list, tuple)):
        raise VisionZipError(f"vision_feature_layer {vision_feature_layer!r} (several layers) is not supported by VisionZip")
    index = num_layers + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer - 1
    if not 0 <= index < num_layers:
        raise VisionZipError(f"vision_feature_layer {vision_feature_layer} is outside a tower of {num_layers} layers")
    return index


class VisionEncoder:
    """One vision tower + its preprocessing, run to the select layer with attention scores and keys.

    Args:
        tower: a vision tower an adapter in :mod:`~comfy_visionzip.towers` knows (CLIP, SigLIP, DINOv2
            with or without registers); it says where the layers, query/key projections, CLS and
            register tokens are.
        preprocess: the checkpoint's preprocessing (see :class:`Preprocess`).
        vision_feature_layer: as in the LLaVA config (-2: the second-to-last layer).
        select_strategy: "default" (the model drops CLS before projecting) or "full" (keeps every token).
        resampler: optional module the model applies to uncompressed features (LLaVA-NeXT-Video's
            2x2 pooling); used by method "full" so that "no compression" is the model's own path.

    Register tokens (DINOv2 with registers) take part in the attention but are dropped from the
    hidden states, keys and scores it returns: they are never patches and never kept tokens.
    """

    def __init__(
        self,
        tower: torch.nn.Module,
        preprocess: Preprocess,
        *,
        vision_feature_layer: int = -2,
        select_strategy: str = "default",
        resampler: torch.nn.Module | None = None,
    ) -> None:
        self.tower = tower
        self.preprocess_spec = preprocess
        self.parts = tower_parts(tower)
        self.num_layers = len(self.parts.layers)
        self.layer_index = select_layer_index(vision_feature_layer, self.num_layers)
        self.layer = self.parts.layers[self.layer_index]
        self.query = self.parts.queries[self.layer_index]  # the select layer's query projection
        self.key = self.parts.keys[self.layer_index]
        self.cls_token = self.parts.cls_token
        self.registers = self.parts.registers
        if select_strategy not in ("default", "full"):
            raise VisionZipError(f"unknown vision_feature_select_strategy {select_strategy!r}; valid: default, full")
        self.select_strategy = select_strategy
        self.resampler = resampler
        self.num_heads = self.parts.num_heads
        self.scale = self.parts.head_dim ** -0.5
        side = (preprocess.tile or self.parts.image_size) // self.parts.patch_size  # DINOv2 runs below its 518 px
        self.grid = (side, side)

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1] + (1 if self.cls_token else 0)

    def decode_cover(self, margin: float = DECODE_MARGIN) -> tuple[int, int]:
        """(height, width) a frame must still cover for this preprocessing to lose nothing, times ``margin``.

        What frames are scaled to while decoding (``VideoHandle.cover``), so host memory per batch
        depends on the encoder's input size, not on the source's resolution.
        """
        spec = self.preprocess_spec
        if spec.pinpoints:  # anyres: the largest grid resolution (the tiles), and the square base image
            height = max(max(h for h, _w in spec.pinpoints), spec.tile)
            width = max(max(w for _h, w in spec.pinpoints), spec.tile)
        elif spec.resize_hw is not None:
            height, width = spec.resize_hw
        else:
            height = width = int(spec.shortest_edge)
        return math.ceil(height * margin), math.ceil(width * margin)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        return preprocess_frames(frames, self.preprocess_spec, device=self.device, dtype=self.dtype)

    def _select_layer(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, key, output) of the select layer for (N, 3, S, S) pixels; the layers after it never run."""
        captured: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(_module, _args, output):
                captured[name] = output
            return hook

        def stop(_module, _args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output  # 4.x layers return tuples
            raise _StopTower

        handles = [
            self.query.register_forward_hook(keep("q")),
            self.key.register_forward_hook(keep("k")),
            self.layer.register_forward_hook(stop),
        ]
        try:
            self.tower(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype))
        except _StopTower:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "hidden" not in captured:
            raise VisionZipError("the vision tower never reached the select layer")
        return captured["q"], captured["k"], captured["hidden"]

    def patch_grid(self, frames: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the patches of these frames (fixed for this tower)."""
        return self.grid

    @torch.inference_mode()
    def attention_from(self, frames: torch.Tensor, point: tuple[float, float]) -> tuple[torch.Tensor, int]:
        """The select layer's attention from one patch to every patch, averaged over heads.

        ``frames`` uint8 [T, H, W, 3] (or a 0..1 IMAGE); ``point`` (x, y) in 0..1 of what the model sees
        (the whole frame for anyres models). Returns ((T, patches) attention, the patch's index).
        This is the paper's feature-misalignment view: a subject's patch often attends to a few
        dominant tokens elsewhere in the frame rather than to its neighbours.
        """
        x, y = point
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise VisionZipError(f"the point must be (x, y) fractions of the frame in 0..1, got {point!r}")
        pixels = self.preprocess(frames)
        if pixels.dim() == 5:  # anyres: the whole frame is the first crop
            pixels = pixels[:, 0]
        rows, cols = self.grid
        patch = min(int(y * rows), rows - 1) * cols + min(int(x * cols), cols - 1)
        token = patch + self.parts.prefix  # after CLS and any registers
        q, k, _hidden = self._select_layer(pixels)
        B, S, _ = k.shape
        H = self.num_heads
        q = q.view(B, S, H, -1).transpose(1, 2).float()[:, :, token]  # (B, H, head_dim)
        k = k.view(B, S, H, -1).transpose(1, 2).float()  # (B, H, S, head_dim)
        probs = (torch.einsum("bhd,bhsd->bhs", q, k) * self.scale).softmax(dim=-1).mean(1)  # (B, S)
        return probs[:, self.parts.prefix:].cpu(), patch

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor, *, chunk: int = 128) -> EncodedImages:
        """Run (N, 3, S, S) pixel values to the select layer; scores and keys from that layer only."""
        q, k, hidden = self._select_layer(pixel_values)
        B, S, _ = k.shape
        H = self.num_heads
        q = q.view(B, S, H, -1).transpose(1, 2).float()  # (B, H, S, head_dim)
        k = k.view(B, S, H, -1).transpose(1, 2).float()  # (B, H, S, head_dim)
        keys = k.mean(1)  # (B, S, head_dim)
        prefix = self.parts.prefix
        if self.registers:  # registers are keys of the attention, but never tokens we return
            keep = torch.cat([torch.arange(1 if self.cls_token else 0), torch.arange(prefix, S)]).to(k.device)
            hidden, keys = hidden[:, keep], keys[:, keep]
        if self.cls_token:
            logits = torch.einsum("bhd,bhsd->bhs", q[:, :, 0], k) * self.scale  # (B, H, S): the CLS row only
            scores = logits.softmax(dim=-1)[:, :, prefix:].sum(1)  # (B, patches): over all keys, read at the patches
        else:
            received = torch.zeros(B, S, device=k.device)
            for start in range(0, S, chunk):  # (B, H, chunk, S) at a time, never S x S for all heads
                probs = (q[:, :, start: start + chunk] @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
                received += probs.sum(dim=(1, 2))
            scores = (received / (H * S))[:, prefix:]  # (B, patches): mean over heads and query rows
        return EncodedImages(hidden, scores, keys, self.cls_token, self.grid)

    def encode(self, frames: torch.Tensor, *, batch_size: int = 8) -> EncodedImages:
        """uint8 [T, H, W, 3] frames (or a float 0..1 IMAGE) -> select-layer outputs of every image the
        model sees: T of them, or T x crops with anyres (``.crops`` per frame, frame by frame)."""
        pixels = self.preprocess(frames)
        crops = 1
        if pixels.dim() == 5:  # anyres: (T, crops, 3, S, S)
            crops = pixels.shape[1]
            pixels = pixels.flatten(0, 1)
        parts = [self.encode_pixels(pixels[i: i + batch_size]) for i in range(0, pixels.shape[0], batch_size)]
        encoded = _concat(parts)
        encoded.crops = crops
        encoded.meta["frame_size"] = (int(frames.shape[1]), int(frames.shape[2]))  # (H, W) as shown
        return encoded

    def view(self, frames: torch.Tensor) -> torch.Tensor:
        return model_view(frames, self.preprocess_spec)

    def zip(self, encoded: EncodedImages, dominant: int, contextual: int, method: str = "visionzip") -> ZipResult:
        """Compress encoded images. ``full`` returns exactly what the model itself would project."""
        if method not in METHODS:
            raise VisionZipError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
        hidden = encoded.hidden
        if method == "visionzip":  # the reference keeps CLS among the dominant tokens
            return compress(hidden, encoded.scores, encoded.keys, dominant, contextual, cls_token=encoded.cls_token)
        drop_cls = encoded.cls_token and self.select_strategy == "default"
        if drop_cls:
            hidden = hidden[:, 1:]
        if method == "full":
            result = compress(hidden, None, None, 0, 0, method="full")
            if self.resampler is not None:
                result = ZipResult(self.resampler(hidden), result.dominant_positions, result.contextual_positions,
                                   result.assignment, method="full")
            if drop_cls:  # positions refer to the input with CLS
                result.dominant_positions += 1
                result.assignment = torch.cat([torch.full_like(result.assignment[:, :1], -1), result.assignment], 1)
            return result
        keep_cls = encoded.cls_token and not drop_cls
        result = compress(hidden, None, None, dominant, contextual, method=method, cls_token=keep_cls,
                          grid=encoded.grid)
        if drop_cls:
            result.dominant_positions += 1
            result.assignment = torch.cat([torch.full_like(result.assignment[:, :1], -1), result.assignment], 1)
        return result


def _concat(parts: list[EncodedImages]) -> EncodedImages:
    first = parts[0]
    if len(parts) == 1:
        return first
    return EncodedImages(
        torch.cat([p.hidden for p in parts]), torch.cat([p.scores for p in parts]), torch.cat([p.keys for p in parts]),
        first.cls_token, first.grid, first.crops,
    )


# ------------------------------------------------------------------------------------- streaming


@dataclass
class CompressedVideo:
    """The compressed visual tokens of a video (or an image batch), ready for the model's projector.

    Only this accumulates while a long video streams through sample -> encode -> zip.
    """

    tokens: torch.Tensor  # (frames, crops * tokens_per_crop, D) on the CPU, the tower's dtype
    timestamps: list[float]  # seconds, one per frame (empty when unknown, e.g. a plain IMAGE batch)
    indices: list[int]  # source frame numbers
    method: str
    dominant: int
    contextual: int
    crops: int = 1
    grid: tuple[int, int] = (0, 0)
    cls_token: bool = True
    scores: torch.Tensor | None = None  # (frames * crops, S') float16, for heatmaps
    assignment: torch.Tensor | None = None  # (frames * crops, S) int16: output token carrying each input token
    preprocess: Preprocess | None = None  # how frames were turned into pixels (to draw heatmaps on frames)
    source: str = ""
    meta: dict = field(default_factory=dict)  # model name, settings (for saving and checking)
    # (frames, K) int32: the position in its image's token sequence each token stands at (CLS 0 where there is
    # one; a contextual token at its target's); for the Qwen families these give the 3D rotary positions
    positions: torch.Tensor | None = None
    # (frames, K) int32, with the temporal stage: the flat index (frame * K + slot) of the token each token
    # repeats, its own when it is kept (see comfy_visionzip.temporal); None: every token is kept
    repeats: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def keep(self) -> torch.Tensor | None:
        """(frames, K) bool: the tokens that reach the model (None: all of them)."""
        if self.repeats is None:
            return None
        own = torch.arange(self.repeats.numel(), dtype=torch.long).view(self.repeats.shape)
        return self.repeats.long() == own

    @property
    def total_tokens(self) -> int:
        """Visual tokens that reach the model (the temporal stage's repeats left out)."""
        keep = self.keep
        return self.num_frames * self.tokens_per_frame if keep is None else int(keep.sum())

    def frame_tokens(self) -> list[int]:
        """Tokens each frame gives the model."""
        keep = self.keep
        return [self.tokens_per_frame] * self.num_frames if keep is None else keep.sum(1).tolist()

    def spans(self) -> torch.Tensor | None:
        """(frames, K) int: for each kept token the last frame (position in this video) it stands for."""
        if self.repeats is None:
            return None
        frames = torch.arange(self.num_frames).repeat_interleave(self.tokens_per_frame)
        last = torch.zeros(self.repeats.numel(), dtype=torch.long)
        last.scatter_reduce_(0, self.repeats.long().flatten(), frames, reduce="amax")
        return last.view(self.repeats.shape)

    def select(self, frames: Sequence[int]) -> CompressedVideo:
        """A copy holding only the given frames (positions into this video, ascending), maps included."""
        keep = sorted({int(f) for f in frames})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_frames:
            raise VisionZipError(f"frames {keep[:4]}... are not all in 0..{self.num_frames - 1}")
        crops = max(self.crops, 1)
        rows = torch.tensor([f * crops + c for f in keep for c in range(crops)], dtype=torch.long)
        setting = self.meta.get("temporal")
        repeats = None
        if self.repeats is not None and not setting:  # no settings to match again: repeats of frames left out
            per = self.tokens_per_frame  # stand for themselves
            new_frame = torch.full((self.num_frames,), -1, dtype=torch.long)
            new_frame[keep] = torch.arange(len(keep))
            old = self.repeats[keep].long()
            old_frame, slot = old // per, old % per
            mapped = new_frame[old_frame] * per + slot
            own = torch.arange(len(keep) * per, dtype=torch.long).view(len(keep), per)
            repeats = torch.where(new_frame[old_frame] >= 0, mapped, own).to(torch.int32)
        thinned = dataclasses.replace(
            self, tokens=self.tokens[keep], timestamps=[self.timestamps[f] for f in keep] if self.timestamps else [],
            indices=[self.indices[f] for f in keep] if self.indices else [],
            scores=self.scores[rows] if self.scores is not None else None,
            assignment=self.assignment[rows] if self.assignment is not None else None, meta=dict(self.meta),
            positions=self.positions[keep] if self.positions is not None else None, repeats=repeats)
        if self.repeats is not None and setting:  # match the kept frames again: a repeat may now repeat another kept one
            from .temporal import Temporal, apply

            config = Temporal(threshold=setting["threshold"], radius=setting["radius"], scene=setting["scene"])
            thinned = apply(thinned, config, width=self.meta.get("temporal_width"))
        return thinned

    def summary(self) -> str:
        where = f" of {self.source}" if self.source else ""
        per_image = self.tokens_per_frame // max(self.crops, 1)
        how = {"visionzip": f"visionzip: {self.dominant} dominant + {self.contextual} contextual per image",
               "full": "full: every token, uncompressed"}.get(self.method, f"{self.method}: {per_image} tokens per image")
        unit = int(self.meta.get("frames_per_unit", 1))
        if unit == 1:
            frames = f"{self.num_frames} frames"
        elif self.num_frames == 1 and not self.timestamps:
            frames = "1 image"
        else:
            frames = f"{self.num_frames} temporal patch{'es' if self.num_frames != 1 else ''} ({unit} frames each)"
        if self.repeats is not None:
            every = self.num_frames * self.tokens_per_frame
            setting = self.meta.get("temporal") or {}
            segments = self.meta.get("temporal_segments", "?")
            how = f"{self.method} {self.dominant}+{self.contextual}" if self.method == "visionzip" else how  # short: one box
            return (f"{frames}{where} x {self.tokens_per_frame} tokens, {every - self.total_tokens} repeats of earlier "
                    f"frames dropped = {self.total_tokens} visual tokens ({how}; temporal {setting.get('threshold', '?')}: "
                    f"{segments} segment{'' if segments == 1 else 's'}, {self.total_tokens / max(every, 1):.0%} kept)")
        return (f"{frames}{where} x {self.tokens_per_frame} tokens = {self.total_tokens} visual tokens "
                f"({how}, {self.crops} image(s) per frame)")


def _unpack(chunk) -> tuple[torch.Tensor, list[float], list[int]]:
    if hasattr(chunk, "frames"):
        return chunk.frames, list(chunk.timestamps), list(chunk.indices)
    if isinstance(chunk, tuple) and len(chunk) == 3:
        return chunk
    if isinstance(chunk, torch.Tensor):  # bare frames: times unknown
        return chunk, [], list(range(chunk.shape[0]))
    raise VisionZipError(f"cannot encode a {type(chunk).__name__}; give VideoClip chunks or frame tensors")


def _batches(chunks: Iterable, batch_size: int):
    """(frames, timestamps, indices) batches of at most ``batch_size`` frames from any chunk stream."""
    for chunk in chunks:
        frames, times, indices = _unpack(chunk)
        for start in range(0, frames.shape[0], batch_size):
            yield (frames[start: start + batch_size], list(times[start: start + batch_size]),
                   list(indices[start: start + batch_size]), getattr(chunk, "source", ""))


def encode_frames(
    encoder: VisionEncoder,
    chunks: Iterable,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
    keep_views: bool = True,
) -> EncodedImages:
    """Encode every frame and keep the uncompressed select-layer outputs (for a handful of frames:
    previews, side-by-side method comparisons). Long videos go through :func:`compress_frames`."""
    parts, views, times, indices = [], [], [], []
    done = 0
    batch_size = _unit_batch(encoder, batch_size)
    for frames, batch_times, batch_indices, _source in _batches(chunks, batch_size):
        batch_times, batch_indices = frame_times(encoder, batch_times, batch_indices)
        encoded = encoder.encode(frames, batch_size=batch_size * 8)
        parts.append(EncodedImages(encoded.hidden.to("cpu"), encoded.scores.to("cpu"), encoded.keys.to("cpu"),
                                   encoded.cls_token, encoded.grid, encoded.crops, meta=encoded.meta))
        if keep_views:
            views.append(encoder.view(frames))
        times += batch_times
        indices += batch_indices
        done += frames.shape[0]
        if progress is not None:
            progress(done, total or done)
    if not parts:
        raise VisionZipError("no frames to encode")
    merged = _concat(parts)
    merged.timestamps, merged.indices = times, indices
    merged.views = torch.cat(views) if keep_views else None
    merged.encoder = encoder
    merged.meta = dict(parts[0].meta)
    return merged


def compress_encoded(encoder: VisionEncoder, encoded: EncodedImages, *, dominant: int, contextual: int,
                     method: str = "visionzip", keep_maps: bool = True) -> CompressedVideo:
    """Compress encoded frames (all crops of a frame stay together, in order)."""
    result = encoder.zip(encoded, dominant, contextual, method)
    frames = encoded.num_frames
    tokens = result.tokens.reshape(frames, -1, result.tokens.shape[-1])  # (frames, crops * K, D)
    return CompressedVideo(
        tokens=tokens.to("cpu"), timestamps=list(encoded.timestamps), indices=list(encoded.indices), method=method,
        dominant=dominant, contextual=contextual, crops=encoded.crops, grid=encoded.grid, cls_token=encoded.cls_token,
        scores=encoded.scores.to("cpu", torch.float16) if keep_maps else None,
        assignment=result.assignment.to("cpu", torch.int16) if keep_maps else None,
        preprocess=encoder.preprocess_spec, meta=dict(encoded.meta),
        positions=token_cells(result).reshape(frames, -1).to("cpu", torch.int32),
    )


def frame_times(encoder, times: list[float], indices: list[int]) -> tuple[list[float], list[int]]:
    """Times and frame numbers per encoded frame: the encoder's own grouping (Qwen: per temporal patch)."""
    if hasattr(encoder, "units"):
        return encoder.units(times, indices)
    return times, indices


def _unit_batch(encoder, size: int) -> int:
    """A batch size that keeps an encoder's temporal patches whole (a multiple of its frames per unit)."""
    unit = getattr(encoder, "frames_per_unit", 1)
    return max(unit, -(-int(size) // unit) * unit)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()  # MPS, older CUDA builds


def auto_batch_size(encoder: VisionEncoder, *, most: int = 64) -> int:
    """Frames per encoder batch for this device: from free GPU memory on CUDA, 8 elsewhere.

    Per image the forward to the select layer holds about S x 8 D activations in the tower's dtype
    (hidden, q/k/v, the MLP's 4 D), our float32 query/key copies for the scores, and the pixels; half
    of the free memory is used, the rest left to the allocator and the language model.
    """
    device = encoder.device
    if device.type != "cuda":
        return 8
    free, _total = torch.cuda.mem_get_info(device)
    seq = getattr(encoder, "patches_per_image", encoder.tokens_per_image)  # Qwen: patches before the 2x2 merge
    width = int(getattr(encoder.tower.config, "hidden_size", 1024))
    size = encoder.preprocess_spec.tile or int(math.isqrt(seq)) * int(getattr(encoder, "patch", 14))
    element = torch.finfo(encoder.dtype).bits // 8
    crops = 1 + (len(encoder.preprocess_spec.pinpoints or ()) and 4)  # anyres: about 1 + 4 tiles per frame
    per_frame = crops * (seq * width * (8 * element + 8) + 3 * size * size * 4)
    return int(max(1, min(most, free * 0.5 // per_frame)))


def compress_frames(
    encoder: VisionEncoder,
    chunks: Iterable,
    *,
    dominant: int,
    contextual: int,
    method: str = "visionzip",
    batch_size: int | None = 8,
    keep_maps: bool = True,
    progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
    prefetch_depth: int = 1,
    temporal=None,
) -> CompressedVideo:
    """Stream frames (VideoClip chunks, (frames, timestamps, indices) tuples or frame tensors) through
    encode + zip, ``batch_size`` frames at a time (None or 0: sized to the device, see
    :func:`auto_batch_size`).

    Each batch is encoded, compressed and dropped: only the compressed tokens (and, with ``keep_maps``,
    small per-token maps for heatmaps) are kept. The next chunk decodes in a background thread while
    the current one encodes (``prefetch_depth`` chunks ahead; 0: no thread). An out-of-memory error
    while encoding (CUDA OOM or a host ``MemoryError``) halves the batch and retries, with a log line.
    ``progress(done_frames, total)`` is called after every batch; raising from it cancels.
    ``temporal`` (a :class:`~comfy_visionzip.temporal.Temporal`, a threshold, a budget or True) drops tokens
    that repeat earlier frames' as the batches stream (see :mod:`comfy_visionzip.temporal`).
    """
    from . import temporal as temporal_stage

    if method not in METHODS:
        raise VisionZipError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
    temporal = temporal_stage.Temporal.parse(temporal)
    if temporal is not None:
        temporal_stage.check(method)
    matcher = None
    width = getattr(encoder, "width", None)  # Qwen: the main features (DeepStack ride along in the same rows)
    if not batch_size:
        batch_size = auto_batch_size(encoder)
        log.info("encoder batch: %d frames (sized to %s)", batch_size, encoder.device)
    batch_size = _unit_batch(encoder, batch_size)
    limit = int(batch_size)  # frames per forward; halved on out-of-memory
    out = _Accumulator(total)
    done = 0
    source = ""
    for frames, times, indices, chunk_source in _batches(prefetch(chunks, prefetch_depth), batch_size):
        source = source or chunk_source
        start = 0
        while start < frames.shape[0]:
            stop = start + limit
            try:
                encoded = encoder.encode(frames[start:stop], batch_size=limit * 8)
                encoded.timestamps, encoded.indices = frame_times(encoder, times[start:stop], indices[start:stop])
                part = compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual,
                                        method=method, keep_maps=keep_maps)
                if temporal is not None:
                    if matcher is None:
                        matcher = temporal_stage.Matcher(temporal, part.grid, cls_token=part.cls_token, crops=part.crops)
                    part.repeats = matcher.video(part, out.frames, width)
                out.add(part)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest is re-raised
                if not _is_out_of_memory(e):
                    raise
                encoded = None
                if encoder.device.type == "cuda":
                    torch.cuda.empty_cache()
                if limit <= getattr(encoder, "frames_per_unit", 1):
                    raise VisionZipError(f"out of memory encoding a single frame on {encoder.device} ({str(e)[:120]}); "
                                         "free memory (other models), use a smaller dtype, or the CPU") from e
                limit = _unit_batch(encoder, max(1, limit // 2))
                log.warning("out of memory encoding on %s; retrying with batches of %d frames", encoder.device, limit)
                continue
            start = stop
        done += frames.shape[0]
        if progress is not None:
            progress(done, total or done)
    if out.first is None:
        raise VisionZipError("no frames to encode")
    first = out.first
    tokens, scores, assignment = out.result()
    video = CompressedVideo(
        tokens=tokens, timestamps=out.timestamps, indices=out.indices, method=method, dominant=dominant,
        contextual=contextual, crops=first.crops, grid=first.grid, cls_token=first.cls_token, scores=scores,
        assignment=assignment, preprocess=encoder.preprocess_spec, source=str(source), meta=dict(first.meta),
        positions=out.positions(), repeats=out.repeats(),
    )
    if temporal is not None:
        temporal_stage.describe(video, temporal, matcher, width)
        if temporal.budget and video.total_tokens > temporal.budget:
            video = temporal_stage.fit(video, temporal, temporal.budget, width=width)
    return video


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.cat(parts) if parts and all(p is not None for p in parts) else None


class _Accumulator:
    """Compressed batches written into tensors allocated once for the planned frame count.

    Concatenating the parts at the end would hold the tokens twice; with the total known, the only
    memory that grows with the video is the tokens' own (and the small heatmap maps).
    """

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.first: CompressedVideo | None = None
        self.parts: list[CompressedVideo] = []  # when the total is unknown
        self.buffers: dict[str, torch.Tensor] = {}
        self.frames = 0
        self.rows = 0  # frames x crops written to the maps
        self.timestamps: list[float] = []
        self.indices: list[int] = []
        self.cells: list[torch.Tensor | None] = []
        self.sources: list[torch.Tensor | None] = []

    def positions(self) -> torch.Tensor | None:
        return _cat(self.cells)

    def repeats(self) -> torch.Tensor | None:
        return _cat(self.sources)

    def add(self, part: CompressedVideo) -> None:
        self.cells.append(part.positions)  # small per-frame maps: concatenated at the end
        self.sources.append(part.repeats)
        self.first = self.first or part
        self.timestamps += part.timestamps
        self.indices += part.indices
        fields = {"tokens": part.tokens, "scores": part.scores, "assignment": part.assignment}
        if not self.total or self.frames + part.num_frames > self.total or (
                self.buffers and part.tokens.shape[1:] != self.buffers["tokens"].shape[1:]):
            self._spill()
            self.parts.append(part)
            self.frames += part.num_frames
            return
        crops = max(part.crops, 1)
        for name, value in fields.items():
            if value is None:
                continue
            if name not in self.buffers:
                rows = self.total if name == "tokens" else self.total * crops
                self.buffers[name] = torch.empty((rows, *value.shape[1:]), dtype=value.dtype)
            if name == "tokens":
                self.buffers[name][self.frames: self.frames + value.shape[0]] = value
            else:
                self.buffers[name][self.rows: self.rows + value.shape[0]] = value
        self.frames += part.num_frames
        self.rows += part.num_frames * crops

    def _spill(self) -> None:
        """Fall back to a list of parts (a total that was wrong, or a change of shape)."""
        if self.buffers and not self.parts:
            first = self.first
            self.parts.append(dataclasses.replace(
                first, tokens=self.buffers["tokens"][: self.frames],
                scores=self.buffers["scores"][: self.rows] if "scores" in self.buffers else None,
                assignment=self.buffers["assignment"][: self.rows] if "assignment" in self.buffers else None))
            self.buffers = {}
        self.total = None

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.parts:
            def cat(name):
                values = [getattr(p, name) for p in self.parts]
                return None if any(v is None for v in values) else torch.cat(values)
            return cat("tokens"), cat("scores"), cat("assignment")
        tokens = self.buffers["tokens"]
        tokens = tokens if self.frames == tokens.shape[0] else tokens[: self.frames].clone()
        maps = []
        for name in ("scores", "assignment"):
            value = self.buffers.get(name)
            maps.append(None if value is None else value if self.rows == value.shape[0] else value[: self.rows].clone())
        return tokens, maps[0], maps[1]


def kept_count(video: CompressedVideo) -> int:
    """How many of each image's output tokens are kept tokens (drawn as such in previews)."""
    if video.method == "visionzip":
        per_image = video.tokens_per_frame // max(video.crops, 1)
        # a frame with no more tokens than asked for (Qwen's small frames) keeps every token
        return per_image if per_image < video.dominant + video.contextual else video.dominant
    if video.method in ("uniform", "full"):
        return video.tokens_per_frame // max(video.crops, 1)
    return 0  # pool: every token is a merge of a cell
