"""The Qwen2.5-VL / Qwen3-VL vision side: the tower run once per batch of temporal patches, VisionZip's
scores and keys read from its last block, and the merged tokens compressed.

How VisionZip reads these towers (the semantics of the VisionZip authors' Qwen2.5-VL release,
``Qwen2_5_VL/qwen2_5vl_visionzip.py`` of dvlab-research / JIA-Lab-research VisionZip, May 2025, kept by
default):
  - scores come from the last vision block (a full-attention block in Qwen2.5-VL): the attention each
    patch receives, averaged over heads and summed over the query rows of its own image (no CLS
    token), computed in query chunks from the block's rotary-embedded query/key (no S x S per head is
    held for a whole batch); keys are the same block's, averaged over heads;
  - scores and keys are averaged over each 2x2 merge group, so one score and one key belong to one
    merged token, and Qwen2.5-VL's window order is undone before anything is selected;
  - dominant + contextual selection runs on the merged tokens (the merger's output; frames vary in size,
    and one with no more merged tokens than asked for keeps them all); a contextual token
    is its target + the mean of the tokens that joined it (as for LLaVA); the kept tokens stay in
    raster order, a contextual token in its target's place;
  - positions: the model's own ``get_rope_index`` runs on the uncompressed layout, and each kept token
    takes its own (t, h, w) (a contextual token its target's); the text after the video keeps the
    positions it has without compression, and generation continues from the largest position + 1
    (what the uncompressed model's ``generate`` does).
Where we differ from that release, on purpose: it handles one image at batch size 1 and no video (its
flash path recomputes a dense softmax over every patch of the batch in bf16, across image boundaries);
here every temporal patch is an image of its own, scored in float32 within itself, any batch, video
included, with no patched model class and the tower's own attention kernel kept (flash included). It
keeps a fixed share of each image (65% dominant + 5% contextual, edited in its source); here the counts
are per temporal patch (``dominant`` / ``contextual``), like every other family, so the budget is exact.
DeepStack (Qwen3-VL) features are pruned and merged with exactly the kept tokens' selection (as the
public Qwen3-VL port does; it merges by plain mean, we keep the authors' target + mean).

A "frame" of a compressed Qwen video is one temporal patch (two sampled frames; an odd last frame is
repeated, as the processor does); its timestamp is the mean of its two frames' times.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ..encoded import EncodedImages, Encoder
from ..encoder import tower_digest
from ..errors import VisionZipError
from ..preprocess import DECODE_MARGIN, Preprocess
from ..zip import METHODS, ZipResult, compress, token_cells
from .qwen_processing import QwenProcessor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision tower's rotary embedding (float32), as the attention applies it to queries and keys."""
    x = x.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class QwenEncoder(Encoder):
    """A Qwen vision tower + its preprocessing, with VisionZip scores, keys and merged tokens per temporal patch.

    Implements :class:`~comfy_visionzip.encoded.Encoder`: its "images" are temporal patches and its tokens
    are merged tokens already in the language model's width (DeepStack features, when the tower has them,
    ride along in the same rows after the main features, so ``width`` is the main features' width).
    """

    def __init__(self, visual: torch.nn.Module, preprocess: Preprocess, *, window: bool = False) -> None:
        self.tower = visual
        self.preprocess_spec = preprocess
        self.cls_token = False
        self.select_strategy = "full"
        tower: Any = visual  # a transformers Qwen vision model
        config = tower.config
        self.merge = int(config.spatial_merge_size)
        self.processor = QwenProcessor(preprocess, self.merge)
        if self.processor.patch != int(config.patch_size):
            raise VisionZipError(f"the processor's patch size {self.processor.patch} is not the tower's "
                                 f"{int(config.patch_size)}: fix preprocessor_config.json")
        self.patch = self.processor.patch
        self.temporal = self.processor.temporal
        self.blocks = list(tower.blocks)
        self.num_layers = len(self.blocks)
        full = list(getattr(config, "fullatt_block_indexes", None) or range(self.num_layers)) if window else \
            list(range(self.num_layers))
        self.layer_index = max(full)  # the last (full-attention) block, as the authors read it
        self.block = self.blocks[self.layer_index]
        self.window = window
        self.num_heads = int(getattr(config, "num_heads", None) or config.num_attention_heads)
        self.hidden = int(config.hidden_size)
        self.head_dim = self.hidden // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.deepstack = len(getattr(config, "deepstack_visual_indexes", None) or ())
        self.width = int(config.out_hidden_size)
        self.grid: tuple[int, int] = (0, 0)  # dynamic: each video's own (see grid_for)
        self.frames_per_unit = self.temporal

    # ---- sizes and pixels (the processor's)
    @property
    def tokens_per_image(self) -> int:
        """Merged tokens of the largest frame the settings allow (a square at max_pixels)."""
        return self.processor.largest_tokens

    @property
    def patches_per_image(self) -> int:
        """Patches the tower attends over for the largest frame (a temporal patch: its merged tokens x 4)."""
        return self.tokens_per_image * self.merge * self.merge

    def grid_for(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of merged tokens for frames of (H, W)."""
        return self.processor.grid_for(frame_size)

    def tokens_for(self, frame_size: tuple[int, int]) -> int:
        return self.processor.tokens_for(frame_size)

    def decode_cover(self, margin: float = DECODE_MARGIN) -> tuple[int, int]:
        return self.processor.decode_cover(margin)

    def preprocess(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (pixel rows, grid_thw) as the model's processor makes them (see :class:`QwenProcessor`)."""
        return self.processor.pixels(frames, self.device, self.dtype)

    def view(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (units, h, w, 3): the first frame of each temporal patch, at the size the model sees it."""
        return self.processor.view(frames, self.device)

    def units(self, times: list[float], indices: list[int]) -> tuple[list[float], list[int]]:
        return self.processor.units(times, indices)

    def frame_bytes(self) -> int:
        """Per sampled frame: half a temporal patch's activations (S x 8 D in the tower's dtype plus our
        float32 query/key copies) over its patches before the 2x2 merge, and its pixels."""
        element = torch.finfo(self.dtype).bits // 8
        side = int(math.isqrt(self.patches_per_image)) * self.patch
        per_unit = self.patches_per_image * self.hidden * (8 * element + 8) + 3 * side * side * 4 * self.temporal
        return max(1, per_unit // self.temporal)

    def identity(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "select_layer": int(self.layer_index), "tower_layers": int(self.num_layers),
                "select_strategy": self.select_strategy, "tower": tower_digest(self.tower.config)}

    # ---- the tower
    def _window_index(self, grid: torch.Tensor) -> torch.Tensor | None:
        if not self.window:
            return None
        visual: Any = self.tower
        if hasattr(visual, "get_window_index"):  # transformers 4.x
            return visual.get_window_index(grid)[0]
        from transformers.vision_utils import get_vision_window_index  # transformers 5.x only (absent in 4.x)

        params = inspect.signature(get_vision_window_index).parameters
        kwargs: dict[str, Any] = {"spatial_merge_size": self.merge, "window_size": visual.window_size,
                                  "patch_size": self.patch}
        if "kwargs" in params:
            kwargs["kwargs"] = {}
        return get_vision_window_index(grid, **kwargs)[0]

    def _forward(self, rows: torch.Tensor,
                 grid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, Any]:
        """Run the tower; returns (merged tokens, [DeepStack features], q, k, cu_seqlens of the score block)."""
        captured: dict[str, Any] = {}

        def pre(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["cu"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            captured["rope"] = kwargs.get("position_embeddings")

        def qkv(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            captured["qkv"] = output

        handles = [self.block.attn.register_forward_pre_hook(pre, with_kwargs=True),
                   self.block.attn.qkv.register_forward_hook(qkv)]
        try:
            out = self.tower(rows.to(self.device), grid_thw=grid.to(self.device))
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(out, tuple):  # transformers 4.x: merged, or (merged, deepstack list)
            merged, deep = ((out[0], list(out[1])) if len(out) > 1 and isinstance(out[1], (list, tuple))
                            else (out[0], []))
        elif isinstance(out, torch.Tensor):
            merged, deep = out, []
        else:
            merged = out.pooler_output
            deep = list(getattr(out, "deepstack_features", None) or [])
        if "qkv" not in captured or captured.get("rope") is None:
            raise VisionZipError("the vision tower's score block was not reached (or got no rotary embedding)")
        seq = captured["qkv"].shape[0]
        q, k, _v = captured["qkv"].reshape(seq, 3, self.num_heads, -1).unbind(1)
        cos, sin = captured["rope"]
        return merged, deep, _rotate(q, cos, sin), _rotate(k, cos, sin), captured["cu"]

    @torch.inference_mode()
    def encode_pixels(self, rows: torch.Tensor, grid: torch.Tensor, *, chunk: int = 256) -> EncodedImages:
        merged, deep, q, k, cu = self._forward(rows, grid)
        units = grid.shape[0]
        per = int(grid[0, 1] * grid[0, 2])  # patches per temporal patch
        group = self.merge * self.merge
        received = torch.zeros(q.shape[0], device=q.device)
        bounds = cu.tolist() if cu is not None else [i * per for i in range(units + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:]):  # one image (temporal patch) at a time
            keys = k[start:stop].transpose(0, 1)  # (H, n, d)
            for row in range(start, stop, chunk):
                query = q[row: min(row + chunk, stop)].transpose(0, 1)  # (H, c, d)
                probs = (query @ keys.transpose(-1, -2) * self.scale).softmax(dim=-1)  # (H, c, n)
                received[start:stop] += probs.sum(dim=1).mean(dim=0)  # summed over rows, mean over heads
        scores = received.view(-1, group).mean(-1)  # one per merged token (window order in Qwen2.5-VL)
        keys = k.mean(1).view(-1, group, self.head_dim).mean(1)  # (tokens, d): over heads, then the 2x2 group
        order = self._window_index(grid)
        if order is not None:  # back to raster order, as the merger's output is
            reverse = torch.argsort(order.to(scores.device))
            scores, keys = scores[reverse], keys[reverse]
        hidden = torch.cat([merged, *deep], dim=-1) if deep else merged
        count = per // group
        return EncodedImages(hidden.reshape(units, count, -1), scores.reshape(units, count),
                             keys.reshape(units, count, -1).float(), False, self._grid_of(grid))

    def _grid_of(self, grid: torch.Tensor) -> tuple[int, int]:
        return int(grid[0, 1]) // self.merge, int(grid[0, 2]) // self.merge

    def encode(self, frames: torch.Tensor, *, batch_size: int = 8) -> EncodedImages:
        """Frames (an even count, or the last one is repeated) -> per temporal patch merged tokens, scores, keys."""
        rows, grid = self.preprocess(frames)
        per = int(grid[0, 1] * grid[0, 2])
        units = grid.shape[0]
        step = max(1, batch_size // self.temporal)
        parts = [self.encode_pixels(rows[u * per: min(u + step, units) * per], grid[u: u + step])
                 for u in range(0, units, step)]
        encoded = EncodedImages.concat(parts)
        encoded.meta["frame_size"] = (int(frames.shape[1]), int(frames.shape[2]))
        encoded.meta["frames_per_unit"] = self.temporal  # each encoded "frame" is a temporal patch
        return encoded

    def patch_grid(self, frames: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the merged tokens of these frames."""
        return self.grid_for((int(frames.shape[1]), int(frames.shape[2])))

    @torch.inference_mode()
    def attention_from(self, frames: torch.Tensor, point: tuple[float, float]) -> tuple[torch.Tensor, int]:
        """The last block's attention from the merged token at (x, y) (its 2x2 patches, averaged over heads)
        to every merged token (the mass on its 2x2 patches), per temporal patch: ((units, cells), the cell)."""
        x, y = point
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise VisionZipError(f"the point must be (x, y) fractions of the frame in 0..1, got {point!r}")
        rows, grid = self.preprocess(frames)
        _merged, _deep, q, k, cu = self._forward(rows, grid)
        height, width = self._grid_of(grid)
        cells = height * width
        cell = min(int(y * height), height - 1) * width + min(int(x * width), width - 1)
        order = self._window_index(grid)
        reverse = torch.argsort(order) if order is not None else None  # raster cell -> position in block order
        group = self.merge * self.merge
        maps = []
        for unit in range(grid.shape[0]):
            start, stop = unit * cells * group, (unit + 1) * cells * group
            at = int(reverse[unit * cells + cell]) if reverse is not None else unit * cells + cell
            query = q[at * group: (at + 1) * group].transpose(0, 1)  # (H, 4, d)
            probs = (query @ k[start:stop].transpose(0, 1).transpose(-1, -2) * self.scale).softmax(-1).mean((0, 1))
            mass = probs.view(cells, group).sum(-1)  # per merged token, in block order
            if reverse is not None:
                mass = mass[reverse[unit * cells: (unit + 1) * cells] - unit * cells]
            maps.append(mass)
        return torch.stack(maps).cpu(), cell

    # ---- compression
    def zip(self, encoded: EncodedImages, dominant: int, contextual: int, method: str = "visionzip") -> ZipResult:
        """Compress merged tokens; the kept tokens come back in raster order with their cells (``positions``)."""
        if method not in METHODS:
            raise VisionZipError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
        hidden = encoded.hidden
        if method != "full" and dominant + contextual >= hidden.shape[1]:
            method = "full"  # a small frame has no more merged tokens than asked for: all of them are kept
        if method == "visionzip":
            result = compress(hidden, encoded.scores, encoded.keys, dominant, contextual, cls_token=False)
        elif method == "full":
            result = compress(hidden, None, None, 0, 0, method="full")
        else:
            result = compress(hidden, None, None, dominant, contextual, method=method, cls_token=False,
                              grid=encoded.grid)
        return raster_order(result)


def raster_order(result: ZipResult) -> ZipResult:
    """Reorder output tokens by the cell each stands for (a contextual token: its target's), and record
    those cells as ``result.positions`` (B, K)."""
    cells = token_cells(result)
    order = torch.argsort(cells, dim=1, stable=True)
    tokens = result.tokens.gather(1, order[..., None].expand(-1, -1, result.tokens.shape[-1]))
    new_index = torch.argsort(order, dim=1)  # old output index -> new
    assignment = torch.where(result.assignment >= 0, new_index.gather(1, result.assignment.clamp(min=0)),
                             result.assignment)
    out = ZipResult(tokens, result.dominant_positions, result.contextual_positions, assignment, method=result.method)
    out.positions = cells.gather(1, order)
    return out


