"""The CLIP / SigLIP / DINOv2 vision encoder: a forward pass that stops at the select layer, and that
layer's CLS attention row (or attention received) and head-averaged keys.

How the scores are read without slowing the tower down:
  - the tower keeps its fast attention (SDPA); nothing asks it for attention maps;
  - forward hooks on *one* model instance capture the select layer's query and key projections
    (outputs of ``q_proj`` / ``k_proj``; no extra matmul) and its output, then stop the forward
    (the remaining layers never run: LLaVA reads the second-to-last layer);
  - with a CLS token only the CLS row of softmax(q k^T) is computed ((B, heads, S) numbers); without
    one (SigLIP) the attention each token receives is accumulated over query chunks, never S x S for
    all heads of a whole batch at once;
  - the hooks are removed in ``finally``; nothing is patched on any class.

:class:`VisionEncoder` implements the :class:`~comfy_visionzip.models.base.Encoder` interface (the Qwen
towers' encoder is :class:`~comfy_visionzip.models.qwen_vision.QwenEncoder`). Pixels come from
:mod:`comfy_visionzip.preprocess`; where a tower's parts are, from :mod:`comfy_visionzip.towers`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import torch

from .encoded import EncodedImages, Encoder
from .errors import VisionZipError
from .preprocess import DECODE_MARGIN, Preprocess, model_view, preprocess_frames
from .towers import tower_parts
from .words import counted
from .zip import METHODS, ZipResult, compress

# config keys that say how a tower was saved or run, not what it computes (left out of its identity)
_RUNTIME_KEYS = ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "architectures",
                 "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
                 "return_dict")


class _StopTower(Exception):
    """Raised by our hook after the select layer: the rest of the tower is not needed."""


def select_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """transformers' ``hidden_states[k]`` is the output of layer k-1 (index 0 = embeddings)."""
    if isinstance(vision_feature_layer, (list, tuple)):
        raise VisionZipError(f"vision_feature_layer {vision_feature_layer!r} (several layers) "
                             "is not supported by VisionZip")
    index = num_layers + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer - 1
    if not 0 <= index < num_layers:
        raise VisionZipError(f"vision_feature_layer {vision_feature_layer} is outside a tower of "
                             f"{counted(num_layers, 'layer')}")
    return index


class VisionEncoder(Encoder):
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
        check_sizes(preprocess, self.parts.image_size, self.parts.patch_size)
        side = (preprocess.tile or self.parts.image_size) // self.parts.patch_size  # DINOv2 runs below its 518 px
        self.grid = (side, side)
        self.frames_per_unit = 1
        config: Any = tower.config
        self.width = int(config.hidden_size)

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
            height = width = int(spec.shortest_edge or 0)
        return math.ceil(height * margin), math.ceil(width * margin)

    def units(self, times: list[float], indices: list[int]) -> tuple[list[float], list[int]]:
        """One encoded image per sampled frame: its own time and number."""
        return list(times), list(indices)

    def frame_bytes(self) -> int:
        """Per frame the forward to the select layer holds about S x 8 D activations in the tower's dtype
        (hidden, q/k/v, the MLP's 4 D), our float32 query/key copies for the scores, and the pixels;
        anyres frames are about 1 + 4 images."""
        element = torch.finfo(self.dtype).bits // 8
        size = self.preprocess_spec.tile
        crops = 1 + (4 if self.preprocess_spec.pinpoints else 0)
        return crops * (self.tokens_per_image * self.width * (8 * element + 8) + 3 * size * size * 4)

    def identity(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "select_layer": int(self.layer_index), "tower_layers": int(self.num_layers),
                "select_strategy": self.select_strategy, "tower": tower_digest(self.tower.config)}

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        return preprocess_frames(frames, self.preprocess_spec, device=self.device, dtype=self.dtype)

    def _select_layer(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, key, output) of the select layer for (N, 3, S, S) pixels; the layers after it never run."""
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[[torch.nn.Module, Any, torch.Tensor], None]:
            def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
                captured[name] = output
            return hook

        def stop(_module: torch.nn.Module, _args: Any, output: Any) -> None:
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
        encoded = EncodedImages.concat(parts)
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





MAX_TILES = 64  # anyres tiles per frame a processor config may ask for (LLaVA-OneVision's anyres_max_9: 36)


def check_sizes(spec: Preprocess, image_size: int, patch: int) -> None:
    """Sizes read from a processor config, bounded by what the tower can use (a config asking for a
    50000-pixel side would allocate gigabytes before anything could fail)."""
    sides = [spec.shortest_edge or 0, *(spec.resize_hw or ()), *(spec.crop_hw or ())]
    sides += [side for hw in spec.pinpoints or () for side in hw]
    limit = max(2 * int(image_size), 1024)
    tile = spec.tile
    if any(side < 0 for side in sides) or tile < patch or tile > limit:
        raise VisionZipError(f"the processor config asks for {tile} px images; this tower takes {patch}..{limit} px "
                             "(its patch size up to twice its image size): fix preprocessor_config.json")
    if spec.pinpoints:
        tiles = max((h // tile) * (w // tile) for h, w in spec.pinpoints)
        if min(min(hw) for hw in spec.pinpoints) < tile or tiles > MAX_TILES:
            raise VisionZipError(f"the processor config's anyres grid (image_grid_pinpoints) asks for up to {tiles} "
                                 f"tiles of {tile} px (at most {MAX_TILES}, each at least one tile): fix "
                                 "preprocessor_config.json")


def tower_digest(config: Any) -> str:
    """A short hash of a tower's config (what it computes; how it was saved or run left out)."""
    values = config.to_dict()
    for key in _RUNTIME_KEYS:
        values.pop(key, None)
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]
