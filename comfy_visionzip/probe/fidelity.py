"""Asking the probe model through the pack's own path, and the compression conditions the fidelity bench compares.

Every answer here comes from :class:`~comfy_visionzip.Chat` generating text (greedy), parsed as its first word;
nothing reads the model's logits on the side. The conditions, all at the same number of visual tokens K:

==============  =========================================================================================
full            every patch token (256)
visionzip       the pack's VisionZip, the paper's split (K=25: 21 dominant + 4 contextual)
dominant        VisionZip's dominant selection only (K dominant, no contextual token)
pool            average pooling to a 2-D lattice (25: 5 x 5, 49: 7 x 7, 81: 9 x 9)
uniform         evenly spaced patches
random          K patches drawn at random (a fixed seed per image)
dominant+grid   this pack's variant: VisionZip's dominant tokens, and instead of merging the rest by key
                similarity, the rest averaged within the cells of a coarse 2-D lattice (one token per cell), so
                the context keeps where things are
==============  =========================================================================================

``random`` and ``dominant+grid`` are built here from the same encoded image (their tokens replace those of a
uniform / VisionZip result of the same count); the others are the pack's own methods.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..answer import Chat, GenerationConfig
from ..encoded import EncodedImages
from ..models.base import VisionLanguageModel
from ..pipeline import compress_encoded, label_tokens
from ..tokens import CompressedVideo
from ..zip import split_tokens
from . import scenes

CONDITIONS = ("visionzip", "dominant", "pool", "uniform", "random", "dominant+grid")
TEST_SEED = 20_000  # test scenes come from this seed stream (training: the build seed, validation: +10000)
ANSWER = GenerationConfig(max_new_tokens=3)


def parse(text: str) -> str:
    """The answer word: the first word of the generated text, lower-cased, without punctuation."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def test_items(photos: Sequence[tuple[str, np.ndarray]], per_task: int, seed: int = 0,
               tasks: Sequence[str] = scenes.TASKS) -> Iterator[tuple[scenes.Scene, scenes.Question, np.ndarray]]:
    """``per_task`` balanced test questions per task on the given (test) backgrounds, task after task."""
    world = scenes.World(photos, TEST_SEED + seed)
    for task in tasks:
        for _ in range(per_task):
            scene, question = world.item(task)
            yield scene, question, world.make(scene)


def single(encoded: EncodedImages, k: int) -> EncodedImages:
    """Image ``k`` of a batch of encoded images, as a one-frame video at 0 s."""
    return EncodedImages(encoded.hidden[k: k + 1], encoded.scores[k: k + 1], encoded.keys[k: k + 1],
                         encoded.cls_token, encoded.grid, 1, timestamps=[0.0], indices=[0], meta=dict(encoded.meta))


def lattice_cells(rows: int, cols: int, cells: int) -> torch.Tensor:
    """(rows * cols,) the cell of each patch when the grid is cut into ``cells`` near-square cells: bands of rows,
    each band cut into columns (bands differ by at most one cell)."""
    bands = max(1, round(math.sqrt(cells * rows / cols)))
    bands = min(bands, cells, rows)
    per_band = [cells // bands + (1 if b < cells % bands else 0) for b in range(bands)]
    out = torch.empty(rows, cols, dtype=torch.long)
    start = 0
    for b, n in enumerate(per_band):
        r0, r1 = b * rows // bands, (b + 1) * rows // bands
        for c in range(cols):
            out[r0:r1, c] = start + min(n - 1, c * n // cols)
        start += n
    return out.flatten()


def condition(vlm: VisionLanguageModel, encoded: EncodedImages, method: str, k: int | None,
              seed: int = 0) -> CompressedVideo:
    """One encoded image compressed the ``method`` way to ``k`` tokens (None with "full"), labelled for ``vlm``."""
    encoder = vlm.video_encoder()
    if method == "full":
        video = compress_encoded(encoder, encoded, dominant=0, contextual=0, method="full", keep_maps=False)
    else:
        assert k is not None
        dominant, contextual = split_tokens(k)
        if method == "visionzip":
            video = compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual, keep_maps=False)
        elif method == "dominant":
            video = compress_encoded(encoder, encoded, dominant=k, contextual=0, keep_maps=False)
        elif method in ("pool", "uniform"):
            video = compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual, method=method,
                                     keep_maps=False)
        elif method == "random":
            video = compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual, method="uniform",
                                     keep_maps=False)
            patches = encoded.hidden[0, 1:] if encoded.cls_token else encoded.hidden[0]
            g = torch.Generator().manual_seed(seed)
            picked = torch.randperm(patches.shape[0], generator=g)[:k].sort().values
            video = dataclasses.replace(video, tokens=patches[picked][None].to(video.tokens.dtype))
        elif method == "dominant+grid":
            video = compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual, keep_maps=False)
            video = dataclasses.replace(video, tokens=dominant_grid(encoder, encoded, dominant, contextual)[None])
        else:
            raise ValueError(f"unknown condition {method!r}; valid: full, {', '.join(CONDITIONS)}")
    label_tokens(vlm, video)
    return video


def dominant_grid(encoder: object, encoded: EncodedImages, dominant: int, contextual: int) -> torch.Tensor:
    """(dominant + contextual, D): VisionZip's dominant tokens, then the mean of the other patches in each cell of
    a ``contextual``-cell lattice (a cell whose patches are all dominant gives the mean of all of them)."""
    result = encoder.zip(encoded, dominant, contextual, "visionzip")  # type: ignore[attr-defined]
    hidden = encoded.hidden[0]
    first = 1 if encoded.cls_token else 0
    rows, cols = encoded.grid
    cells = lattice_cells(rows, cols, contextual)
    kept = torch.zeros(hidden.shape[0], dtype=torch.bool)
    kept[result.dominant_positions[0]] = True
    patches, rest = hidden[first:].float(), ~kept[first:]
    context = []
    for c in range(contextual):
        inside = cells == c
        chosen = inside & rest if bool((inside & rest).any()) else inside
        context.append(patches[chosen].mean(0))
    tokens = torch.cat([hidden[result.dominant_positions[0]].float(), torch.stack(context)]) if context else \
        hidden[result.dominant_positions[0]].float()
    return tokens.to(hidden.dtype)


def ask(vlm: VisionLanguageModel, video: CompressedVideo, question: str) -> str:
    """The probe's answer word to ``question`` about ``video``, through Chat (greedy)."""
    chat = Chat(vlm, video)
    return parse(chat.ask(question, ANSWER))
