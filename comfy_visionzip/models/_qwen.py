"""What Qwen2.5-VL and Qwen3-VL share: dynamic-resolution patches in temporal pairs, a vision tower
whose 2x2 merger already projects into the language model's width, and 3D (time, height, width)
rotary positions in the language model.

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
are per temporal patch (``dominant`` / ``contextual``), like every other family, so the budget is exact. DeepStack (Qwen3-VL) features are pruned and merged
with exactly the kept tokens' selection (as the public Qwen3-VL port does; it merges by plain mean,
we keep the authors' target + mean).

A "frame" of a compressed Qwen video is one temporal patch (two sampled frames; an odd last frame is
repeated, as the processor does); its timestamp is the mean of its two frames' times.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..encoder import DECODE_MARGIN, EncodedImages, Preprocess, resize_bicubic
from ..errors import VisionZipError
from ..zip import METHODS, ZipResult, compress, token_cells
from .base import FamilyModule

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


def qwen_preprocess(config: dict, *, video: bool) -> Preprocess:
    """The Preprocess of a Qwen processor config (min/max pixels, patch, merge, temporal patch)."""
    size = config.get("size") or {}
    patch = int(config.get("patch_size", 14))
    merge = int(config.get("merge_size", 2))
    factor = patch * merge
    least = int(config.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    most = int(config.get("max_pixels") or size.get("longest_edge") or factor * factor * 1280)
    if video:
        most = min(most, VIDEO_TOKENS_PER_FRAME * factor * factor)
    mean = tuple(float(v) for v in config.get("image_mean") or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(float(v) for v in config.get("image_std") or (0.26862954, 0.26130258, 0.27577711))
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    return Preprocess(mean=mean, std=std, rescale=rescale,
                      pixels=(factor, least, most, patch, int(config.get("temporal_patch_size", 2))))


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(units * temporal, 3, H, W) normalised frames -> (units * H/patch * W/patch, 3 * temporal * patch * patch)
    rows in the processors' order (merge groups of 2x2 patches together, raster order of the groups)."""
    frames, channels, height, width = pixels.shape
    gh, gw = height // patch, width // patch
    x = pixels.reshape(frames // temporal, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (units, gh/m, gw/m, m, m, C, T, p, p)
    return x.reshape(-1, channels * temporal * patch * patch)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision tower's rotary embedding (float32), as the attention applies it to queries and keys."""
    x = x.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class QwenEncoder:
    """A Qwen vision tower + its preprocessing, with VisionZip scores, keys and merged tokens per temporal patch.

    Stands where :class:`~comfy_visionzip.encoder.VisionEncoder` does (the same ``encode`` / ``zip`` /
    ``view`` / ``decode_cover``); its "images" are temporal patches and its tokens are merged tokens
    already in the language model's width (DeepStack features, when the tower has them, ride along
    in the same rows after the main features).
    """

    cls_token = False
    registers = 0
    select_strategy = "full"
    resampler = None

    def __init__(self, visual: torch.nn.Module, preprocess: Preprocess, *, window: bool = False) -> None:
        self.tower = visual
        self.preprocess_spec = preprocess
        self.factor, self.min_pixels, self.max_pixels, self.patch, self.temporal = preprocess.pixels
        config = visual.config
        self.merge = int(config.spatial_merge_size)
        self.blocks = list(visual.blocks)
        self.num_layers = len(self.blocks)
        full = list(getattr(config, "fullatt_block_indexes", None) or range(self.num_layers)) if window else \
            list(range(self.num_layers))
        self.layer_index = max(full)  # the last (full-attention) block, as the authors read it
        self.block = self.blocks[self.layer_index]
        self.window = window
        self.num_heads = int(getattr(config, "num_heads", None) or config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.deepstack = len(getattr(config, "deepstack_visual_indexes", None) or ())
        self.width = int(config.out_hidden_size)
        self.grid = (0, 0)  # dynamic: each video's own (see grid_for)
        self.frames_per_unit = self.temporal

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    # ---- sizes
    def size_for(self, frame_size) -> tuple[int, int]:
        height, width = (int(v) for v in frame_size)
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_for(self, frame_size) -> tuple[int, int]:
        """(rows, cols) of merged tokens for frames of (H, W)."""
        height, width = self.size_for(frame_size)
        return height // self.factor, width // self.factor

    def tokens_for(self, frame_size) -> int:
        rows, cols = self.grid_for(frame_size)
        return rows * cols

    @property
    def tokens_per_image(self) -> int:
        """Merged tokens of the largest frame the settings allow (a square at max_pixels)."""
        side = int(math.isqrt(self.max_pixels))
        return self.tokens_for((side, side))

    @property
    def patches_per_image(self) -> int:
        """Patches the tower attends over for the largest frame (a temporal patch: its merged tokens x 4)."""
        return self.tokens_per_image * self.merge * self.merge

    def decode_cover(self, margin: float = DECODE_MARGIN) -> tuple[int, int]:
        side = math.ceil(math.sqrt(self.max_pixels) * margin)
        return side, side

    # ---- pixels
    def _resized(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] (or 0..1 IMAGE) -> float (T, 3, h, w) 0..255 at the size the processor picks."""
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise VisionZipError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            if not frames.is_floating_point():
                raise VisionZipError(f"frames must be uint8 0..255 or float 0..1, got {frames.dtype}")
            frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
        height, width = self.size_for(frames.shape[1:3])
        x = frames.to(self.device).permute(0, 3, 1, 2).float()
        return resize_bicubic(x, height, width)

    def preprocess(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (pixel rows, grid_thw (units, 3)) as the model's processor makes them: resized to
        multiples of patch x merge, normalised, an odd last frame repeated, two frames per temporal patch."""
        x = self._resized(frames)
        if x.shape[0] % self.temporal:
            x = torch.cat([x, x[-1:].expand(self.temporal - x.shape[0] % self.temporal, -1, -1, -1)])
        spec = self.preprocess_spec
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        x = (x * spec.rescale - mean) / std
        rows = patchify(x, self.patch, self.merge, self.temporal)
        units = x.shape[0] // self.temporal
        grid = torch.tensor([[1, x.shape[2] // self.patch, x.shape[3] // self.patch]] * units)
        return rows.to(self.dtype), grid

    def view(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (units, h, w, 3): the first frame of each temporal patch, at the size the model sees it."""
        x = self._resized(frames)[:: self.temporal]
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

    # ---- the tower
    def _window_index(self, grid: torch.Tensor) -> torch.Tensor | None:
        if not self.window:
            return None
        visual = self.tower
        if hasattr(visual, "get_window_index"):  # transformers 4.x
            return visual.get_window_index(grid)[0]
        from transformers.vision_utils import get_vision_window_index  # 5.x

        params = inspect.signature(get_vision_window_index).parameters
        kwargs = {"spatial_merge_size": self.merge, "window_size": visual.window_size, "patch_size": self.patch}
        if "kwargs" in params:
            kwargs["kwargs"] = {}
        return get_vision_window_index(grid, **kwargs)[0]

    def _forward(self, rows: torch.Tensor, grid: torch.Tensor):
        """Run the tower; returns (merged tokens, [DeepStack features], q, k, cu_seqlens of the score block)."""
        captured: dict = {}

        def pre(_module, args, kwargs):
            captured["cu"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            captured["rope"] = kwargs.get("position_embeddings")

        def qkv(_module, _args, output):
            captured["qkv"] = output

        handles = [self.block.attn.register_forward_pre_hook(pre, with_kwargs=True),
                   self.block.attn.qkv.register_forward_hook(qkv)]
        try:
            out = self.tower(rows.to(self.device), grid_thw=grid.to(self.device))
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(out, tuple):  # transformers 4.x: merged, or (merged, deepstack list)
            merged, deep = (out[0], list(out[1])) if len(out) > 1 and isinstance(out[1], (list, tuple)) else (out[0], [])
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
        if len(parts) == 1:
            encoded = parts[0]
        else:
            encoded = EncodedImages(torch.cat([p.hidden for p in parts]), torch.cat([p.scores for p in parts]),
                                    torch.cat([p.keys for p in parts]), False, parts[0].grid)
        encoded.meta["frame_size"] = (int(frames.shape[1]), int(frames.shape[2]))
        encoded.meta["frames_per_unit"] = self.temporal  # each encoded "frame" is a temporal patch
        return encoded

    def patch_grid(self, frames: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the merged tokens of these frames."""
        return self.grid_for(frames.shape[1:3])

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
            result = compress(hidden, None, None, dominant, contextual, method=method, cls_token=False, grid=encoded.grid)
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


class QwenFamily(FamilyModule):
    """The interface of :class:`~comfy_visionzip.models.base.FamilyModule` for the Qwen families."""

    video_input = "video"
    window = False  # Qwen2.5-VL: window attention in most vision blocks
    timestamp_text = False  # Qwen3-VL: "<t seconds>" before each temporal patch

    # ---- parts of the model (transformers 5: model.model.{visual, language_model}; 4.x: model.visual, model.model)
    def visual(self, vlm):
        inner = getattr(vlm.model, "model", None)
        return getattr(inner, "visual", None) or vlm.model.visual

    def language_model(self, vlm):
        inner = vlm.model.model
        return getattr(inner, "language_model", inner)

    def rope_owner(self, vlm):
        inner = getattr(vlm.model, "model", None)
        return inner if hasattr(inner, "get_rope_index") else vlm.model

    # ---- vision
    def preprocess(self, vlm) -> Preprocess:
        return qwen_preprocess(vlm.video_config or vlm.image_config, video=True)

    def encoder(self, vlm) -> QwenEncoder:
        return QwenEncoder(self.visual(vlm), self.preprocess(vlm), window=self.window)

    def token_width(self, vlm) -> int:
        encoder = vlm.video_encoder()
        return encoder.width * (1 + encoder.deepstack)

    def projector(self, vlm):
        return None  # the tower's merger already projected the tokens

    def project(self, vlm, video) -> torch.Tensor:
        width = vlm.video_encoder().width
        tokens = video.tokens.to(vlm.device, vlm.dtype)[..., :width]
        keep = video.keep
        return tokens[keep.to(tokens.device)] if keep is not None else tokens.reshape(-1, width)

    def layout(self, vlm, *, method, dominant, contextual, frame_size):
        from ..projection import VisualLayout

        encoder = vlm.video_encoder()
        full = encoder.tokens_for(frame_size) if frame_size else encoder.tokens_per_image
        probe = EncodedImages(torch.zeros(1, full, 1), torch.zeros(1, full), torch.zeros(1, full, 1), False,
                              encoder.grid_for(frame_size) if frame_size else (1, full))
        per = encoder.zip(probe, dominant, contextual, method).tokens.shape[1]  # the encoder's own count (small frames too)
        return VisualLayout(per_frame=int(per), extra=0, crops=1, per_image=int(per), frames_per_unit=encoder.temporal)

    # ---- prompt
    def content_kind(self, video) -> str:
        """A single picture without times goes in as an image (image_pad, image grid), the rest as video."""
        return "image" if video.num_frames == 1 and not video.timestamps else "video"

    def time_text(self, video) -> str:
        return ""  # times are in the positions (Qwen2.5-VL) or before each temporal patch (Qwen3-VL)

    def placeholder_span(self, token_text: str) -> str:
        return "<|vision_start|>" + token_text + "<|vision_end|>"

    def visual_text(self, builder, video, per_frame, stamps) -> str | None:
        """The text replacing the template's vision part (vision_start + pad + vision_end)."""
        count = video.visual_tokens // max(video.num_frames, 1) if per_frame is None else per_frame
        counts = list(video.frame_tokens) if video.frame_tokens and per_frame is None else [count] * video.num_frames
        start, end = "<|vision_start|>", "<|vision_end|>"
        if self.timestamp_text and builder.kind == "video":
            times = video.timestamps if video.timestamps else [0.0] * video.num_frames  # the model's format needs them
            return "".join(f"<{t:.1f} seconds>{start}{builder.token_text * n}{end}" for t, n in zip(times, counts))
        total = video.visual_tokens if per_frame is None else per_frame * video.num_frames
        return start + builder.token_text * total + end

    # ---- running the language model
    def chat_state(self, vlm, video) -> dict:
        encoder = vlm.video_encoder()
        width = encoder.width
        grid = tuple(video.grid)
        if video.positions is None:
            raise VisionZipError("these Qwen tokens carry no token positions (made by an older version); encode again")
        deep = []
        if encoder.deepstack:
            tokens = video.tokens.to(vlm.device, vlm.dtype)
            keep = video.keep
            deep = [tokens[..., width * (i + 1): width * (i + 2)] for i in range(encoder.deepstack)]
            deep = [d[keep.to(d.device)] if keep is not None else d.reshape(-1, width) for d in deep]
        times = list(video.timestamps)
        # seconds between temporal patches (the processor's temporal_patch_size / fps); the last patch may hold a
        # repeated frame, so it is left out where there are others
        span = times[:-1] if len(times) > 2 else times
        spacing = round((span[-1] - span[0]) / (len(span) - 1), 6) if len(span) > 1 else 1.0
        return {"grid": grid, "positions": video.positions.long(), "keep": video.keep, "deepstack": deep,
                "spacing": float(spacing),
                "rope": None}

    def _rope(self, vlm, state, ids: list[int], kind: str, token_id: int) -> torch.Tensor:
        """(3, len(ids)) positions of a prompt: the model's own get_rope_index on the uncompressed layout,
        read at each kept token's own cell (and at every text token)."""
        rows, cols = state["grid"]
        cells = rows * cols
        positions = state["positions"]  # (units, K)
        units, per = positions.shape
        keep = state.get("keep")
        slots = [(u, k) for u in range(units) for k in range(per) if keep is None or bool(keep[u, k])]
        full: list[int] = []
        where: list[int] = []
        seen = base = 0
        for token in ids:
            if token == token_id:
                if seen >= len(slots):
                    raise VisionZipError(f"the prompt holds more visual tokens than the video's {len(slots)}")
                unit, slot = slots[seen]
                if seen == 0 or slots[seen - 1][0] != unit:  # the unit's uncompressed cells start here
                    base = len(full)
                    full.extend([token_id] * cells)
                where.append(base + int(positions[unit, slot]))
                seen += 1
            else:
                where.append(len(full))
                full.append(token)
        if seen != len(slots):
            raise VisionZipError(f"the prompt holds {seen} visual tokens, the video {len(slots)}")
        owner = self.rope_owner(vlm)
        input_ids = torch.tensor([full])
        merge = vlm.video_encoder().merge
        grid_thw = torch.tensor([[units, rows * merge, cols * merge]])
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        params = inspect.signature(owner.get_rope_index).parameters
        if kind == "image":
            kwargs["image_grid_thw"] = grid_thw
        else:
            kwargs["video_grid_thw"] = grid_thw
            if "second_per_grid_ts" in params:
                kwargs["second_per_grid_ts"] = torch.tensor([state["spacing"]])
        if "mm_token_type_ids" in params:
            kwargs["mm_token_type_ids"] = (input_ids == token_id).int() * (1 if kind == "image" else 2)
        full_positions, _delta = owner.get_rope_index(**{k: v for k, v in kwargs.items() if k in params})
        return full_positions[:, 0, torch.tensor(where)]

    def positions(self, chat, ids: list[int]) -> torch.Tensor:
        """(3, len(ids)): the first prompt's positions from the model's rope index, then one more per token
        after its largest position (generated answers and follow-ups, as ``generate`` continues)."""
        state = chat.family_state
        first = chat.first_prompt_length or len(ids)
        key = tuple(ids[:first])
        if state["rope"] is None or state["rope"][0] != key:
            state["rope"] = (key, self._rope(chat.vlm, state, list(key), chat.kind, chat.token_id))
        head = state["rope"][1]
        rest = len(ids) - head.shape[1]
        if rest <= 0:
            return head[:, : len(ids)]
        tail = torch.arange(rest).view(1, -1).expand(3, -1) + head.max() + 1
        return torch.cat([head, tail], dim=1)

    def run(self, chat, emb: torch.Tensor, ids: list[int], start: int, cache_kwargs: dict):
        """Run ids[start:] (embedded as ``emb``) with their positions; returns the model's output."""
        position_ids = self.positions(chat, ids)[:, start:].unsqueeze(1).to(emb.device)  # (3, 1, L)
        out = chat.vlm.model(inputs_embeds=emb, position_ids=position_ids, **cache_kwargs)
        return out.logits[0, -1].float(), getattr(out, chat.cache_kwarg)
