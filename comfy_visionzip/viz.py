"""Pictures for people: contact sheets of sampled frames, attention heatmaps and kept-token overlays, and the
legends under them (text enlarged with the picture, so it reads at the size ComfyUI shows a preview)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .tokens import CompressedVideo


def contact_sheet(
    frames: torch.Tensor | np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    tile_width: int = 240,
) -> np.ndarray:
    """Tile frames (uint8 [T, H, W, 3]) into one RGB uint8 image, each with its label underneath."""
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
        # Image.BILINEAR: Pillow sets these module aliases with setattr, so its type information lacks them
        # (Image.Resampling needs Pillow >= 9.1; the project supports Pillow 9.0)
        tile = Image.fromarray(arr[k]).resize((tile_width, tile_h), Image.BILINEAR)  # type: ignore[attr-defined]
        sheet.paste(tile, (x, y))
        if labels:
            draw.text((x + 4, y + tile_h + 2), str(labels[k]), fill=(230, 230, 230))
    return np.asarray(sheet)


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# Anchor colours of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno").
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in 0..1 to uint8 RGB (dark purple = low, bright yellow = high)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(v).astype(int)
    high = np.minimum(low + 1, len(_INFERNO) - 1)
    frac = (v - low)[..., None]
    return (_INFERNO[low] * (1 - frac) + _INFERNO[high] * frac).round().astype(np.uint8)


def _patch_grid(values: torch.Tensor, grid: tuple[int, int], cls_token: bool) -> torch.Tensor:
    """Per-token values (with CLS first when ``cls_token``) -> (rows, cols) over the patches."""
    patches = values[1:] if cls_token and values.shape[0] == grid[0] * grid[1] + 1 else values
    return patches.reshape(grid)


def _upsample(grid_values: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = grid_values.shape
    ys = np.minimum((np.arange(height) * rows) // height, rows - 1)
    xs = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return grid_values[ys][:, xs]


def attention_overlays(views: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int], *, cls_token: bool,
                       alpha: float = 0.6) -> np.ndarray:
    """The attention each patch gets at the select layer, over what the model saw of each frame.

    ``views`` uint8 (T, S, S, 3); ``scores`` (T, P) CLS attention to each patch, or attention received.
    Each frame is scaled to its own range. Returns uint8 (T, S, S, 3).
    """
    out = []
    for view, score in zip(views.numpy(), scores.float()):
        heat = _patch_grid(score, grid, False).numpy()
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        colour = colormap(_upsample(heat, *view.shape[:2])).astype(np.float32)
        out.append((view.astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8))
    return np.stack(out)


def _group_colour(j: int) -> np.ndarray:
    hue = (j * 0.618033988749895) % 1.0  # golden-ratio hues: neighbours look different
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return (255 * (1 - np.clip(np.minimum(k, 4 - k), 0, 1) * 0.85)).astype(np.float32)


def token_overlays(views: torch.Tensor, assignment: torch.Tensor, grid: tuple[int, int], *, cls_token: bool,
                   kept: int, repeated: torch.Tensor | None = None, notes: list[str] | None = None) -> np.ndarray:
    """Which patches were kept and which were merged into which token.

    ``assignment`` (T, S): the output token carrying each input token (-1 dropped). Tokens ``< kept`` are
    kept as they are (dominant): drawn in full colour; patches merged into token j are tinted with j's
    colour over a dimmed frame; dropped patches are dark. ``repeated`` (T, K) bool, from the temporal stage:
    patches of tokens that repeat a token kept in an earlier frame get a blue hatch; ``notes`` a line of
    text per frame (what survived from which frame). Returns uint8 (T, S, S, 3).
    """
    out = []
    for t, (view, assign) in enumerate(zip(views.numpy(), assignment.long())):
        cells = _patch_grid(assign, grid, cls_token).numpy()
        pixel_cells = _upsample(cells, *view.shape[:2])
        img = view.astype(np.float32)
        result = img * 0.25  # dropped: dark
        dominant = (pixel_cells >= 0) & (pixel_cells < kept)
        result[dominant] = img[dominant]
        for j in np.unique(pixel_cells[pixel_cells >= kept]):
            where = pixel_cells == j
            result[where] = img[where] * 0.35 + _group_colour(int(j)) * 0.65
        # grid lines between patches of different tokens
        edges = np.zeros(pixel_cells.shape, bool)
        edges[1:] |= pixel_cells[1:] != pixel_cells[:-1]
        edges[:, 1:] |= pixel_cells[:, 1:] != pixel_cells[:, :-1]
        result[edges] = result[edges] * 0.5
        if repeated is not None:
            carried = np.isin(pixel_cells, np.flatnonzero(repeated[t].numpy()))
            yy, xx = np.indices(pixel_cells.shape)
            hatch = carried & (((yy + xx) // 3) % 3 == 0)
            result[carried] = result[carried] * 0.55 + np.array((40, 90, 230), np.float32) * 0.45
            result[hatch] = (90, 150, 255)
        image = result.round().clip(0, 255).astype(np.uint8)
        if notes:  # on a dark strip across the top, as wide as the text
            label = _text_band([notes[t]], image.shape[1], background=(16, 16, 16), wrap=True)
            used = np.flatnonzero((label != 16).any(axis=(0, 2)))
            width = min(image.shape[1], int(used.max()) + 1 + 4 * text_scale(image.shape[1])) if used.size else 0
            image = image.copy()
            image[: label.shape[0], :width] = label[: image.shape[0], :width]
        out.append(image)
    return np.stack(out)


def enlarge(images: np.ndarray | torch.Tensor, min_side: int = 336) -> np.ndarray:
    """uint8 (T, H, W, 3) scaled up by a whole factor (nearest: patch borders stay sharp) until the shorter
    side is at least ``min_side``; for showing small models' 48 px views on a screen. Larger ones are kept."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    factor = max(1, math.ceil(min_side / max(min(arr.shape[1:3]), 1)))
    if factor == 1:
        return arr
    return arr.repeat(factor, axis=1).repeat(factor, axis=2)


LEGENDS = {
    "attention": "attention at the select layer: dark = little, yellow = most (each frame to its own range)",
    "tokens": "full colour = kept (dominant); one tint per contextual token = the patches merged into it; "
              "dark = dropped",
    "temporal": "full colour = kept (dominant); tint = merged into a contextual token; blue hatch = repeats a "
                "token of an earlier frame (dropped); dark = dropped",
    "patch": "white square = the chosen patch; colour = its attention to each patch (dark = little, yellow = most)",
}
_LINE = 12  # px a line of text at scale 1 (PIL's default font is about 11 px tall)


def text_scale(width: int) -> int:
    """How many times text drawn on a picture ``width`` px wide is enlarged: a line is then about 1/14 of the
    width (2x for 336 px), so it stays readable where ComfyUI shows the picture about 350 px wide."""
    return max(1, round(width / 220))


def _font(scale: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, int]:
    """(font, enlargement): PIL's default font at ``scale`` times its size where it is scalable (Pillow >= 10.1);
    else its bitmap font, drawn at 1x and enlarged ``scale`` times afterwards (nearest: crisp letters)."""
    try:
        return ImageFont.load_default(size=(_LINE - 2) * scale), 1
    except TypeError:  # Pillow < 10.1: load_default() takes no size
        return ImageFont.load_default(), scale


def _wrap(text: str, fits: Callable[[str], bool]) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        longer = f"{line} {word}" if line else word
        if line and not fits(longer):
            lines.append(line)
            line = word
        else:
            line = longer
    return [*lines, line]


def _text_band(lines: list[str], width: int, *, background: tuple[int, int, int] = (24, 24, 24),
               wrap: bool = False) -> np.ndarray:
    """uint8 (H, width, 3): ``lines`` in PIL's default font at :func:`text_scale` times its size, wrapped at
    ``width`` when ``wrap``."""
    scale = text_scale(width)
    font, enlarge = _font(scale)
    small, unit = max(width // enlarge, 1), scale // enlarge  # drawing width, and px per 1x px while drawing
    pad = 4 * unit
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    if wrap:
        lines = [part for line in lines for part in _wrap(line, lambda t: measure(t, font=font) <= small - 2 * pad)]
    band = Image.new("RGB", (small, 2 * pad + _LINE * unit * len(lines)), background)
    draw = ImageDraw.Draw(band)
    for k, text in enumerate(lines):
        draw.text((pad, pad + _LINE * unit * k), text, fill=(235, 235, 235), font=font)
    if enlarge > 1:  # Image.NEAREST: see contact_sheet on Pillow's module aliases
        band = band.resize((small * enlarge, band.height * enlarge), Image.NEAREST)  # type: ignore[attr-defined]
    out = Image.new("RGB", (width, band.height), background)
    out.paste(band, (0, 0))
    return np.asarray(out)


def with_legend(images: np.ndarray, kind: str) -> np.ndarray:
    """Each image with a band underneath saying what the colours mean (and a colour scale for attention), its text
    enlarged with the picture (:func:`text_scale`) so it can be read at the size a preview is shown."""
    if kind not in LEGENDS:
        raise ValueError(f"unknown legend {kind!r}; valid: {', '.join(LEGENDS)}")
    out = []
    for image in np.asarray(images):
        width = image.shape[1]
        parts = [_text_band([LEGENDS[kind]], width, wrap=True)]
        if kind in ("attention", "patch"):  # the colour scale the words refer to, as tall as a line of them
            ramp_h = _LINE * text_scale(width)
            parts.insert(0, colormap(np.linspace(0, 1, width)[None].repeat(ramp_h, axis=0)))
        out.append(np.concatenate([image, *parts], axis=0))
    return np.stack(out)


def mark_patch(images: np.ndarray, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """Draw a white square around patch ``patch`` (row-major in ``grid``) on every image."""
    out = np.array(images, copy=True)
    rows, cols = grid
    height, width = out.shape[1:3]
    top, left = (patch // cols) * height // rows, (patch % cols) * width // cols
    bottom, right = ((patch // cols) + 1) * height // rows - 1, ((patch % cols) + 1) * width // cols - 1
    line = max(1, min(height, width) // 150)
    for img in out:
        img[top: top + line, left: right + 1] = 255
        img[bottom - line + 1: bottom + 1, left: right + 1] = 255
        img[top: bottom + 1, left: left + line] = 255
        img[top: bottom + 1, right - line + 1: right + 1] = 255
    return out


def temporal_notes(video: CompressedVideo, picks: list[int]) -> tuple[torch.Tensor | None, list[str] | None]:
    """For the whole-frame image of each picked frame: which of its tokens repeat earlier frames' (T, K) and
    a line saying how many are new and which frames the others come from; (None, None) without the stage."""
    repeats = video.repeats
    if repeats is None:
        return None, None
    keep, spans = video.keep, video.spans()
    if keep is None or spans is None:  # both are None exactly when repeats is
        return None, None
    per = video.tokens_per_frame // max(video.crops, 1)
    source_frame = repeats.long() // video.tokens_per_frame
    times = list(video.timestamps) or [float(i) for i in range(video.num_frames)]
    unit = "s" if video.timestamps else ""
    repeated: list[torch.Tensor] = []
    notes: list[str] = []
    for f in picks:
        repeated.append(~keep[f, :per])
        new = int(keep[f].sum())
        sources = sorted(set(source_frame[f][~keep[f]].tolist()))
        last = int(spans[f][keep[f]].max()) if new else f
        note = f"{times[f]:.1f}{unit}: {new} new, to {times[last]:.1f}{unit}"
        if sources:
            note += f"; {video.tokens_per_frame - new} from {times[sources[0]]:.1f}{unit}+"
        notes.append(note)
    return torch.stack(repeated), notes
