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
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..answer import Chat, GenerationConfig
from ..encoded import EncodedImages
from ..models.base import VisionLanguageModel
from ..pipeline import compress_encoded, label_tokens
from ..temporal import Temporal, fit
from ..tokens import CompressedVideo
from ..zip import split_tokens
from . import footage, scenes

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


# ------------------------------------------------------------------------------------------- video

VIDEO_SECONDS = 80  # test videos: 80 frames, one per second
VIDEO_BUDGET = 2048  # visual tokens: 8 frames x 256 full tokens


@dataclass(frozen=True)
class Event:
    """An object shown, in one place, from second ``start`` for ``duration`` seconds."""

    thing: scenes.Thing
    start: int
    duration: int

    def covers(self, second: int) -> bool:
        return self.start <= second < self.start + self.duration


@dataclass(frozen=True)
class VideoItem:
    """A test video (a background sequence and two events) and its two questions: when the first event's object
    appears (right: any second it is visible) and which of the two comes first."""

    background: int
    events: tuple[Event, Event]
    when: scenes.Question
    order: scenes.Question


def backgrounds(clips: Sequence[str], seed: int = 0) -> list[tuple[str, list[np.ndarray]]]:
    """80-frame background sequences: each test clip's frames spread over 80 seconds (centre square, 224 px), and
    two generated ones, drifting stripes and clouds fading into other clouds."""
    rng = np.random.default_rng(TEST_SEED + 7 + seed)
    out = []
    for clip in clips:
        frames = [f for _name, f in footage.frames_of(clip)]
        picks = [round(t * (len(frames) - 1) / (VIDEO_SECONDS - 1)) for t in range(VIDEO_SECONDS)]
        out.append((os.path.basename(clip), [square(frames[i]) for i in picks]))
    wide = scenes.texture("stripes", rng, width=scenes.SIZE + 2 * VIDEO_SECONDS)
    out.append(("stripes", [wide[:, 2 * t: 2 * t + scenes.SIZE] for t in range(VIDEO_SECONDS)]))
    a, b = scenes.texture("clouds", rng), scenes.texture("clouds", rng)
    out.append(("clouds", [a + (b - a) * (t / (VIDEO_SECONDS - 1)) for t in range(VIDEO_SECONDS)]))
    return out


def square(frame: np.ndarray) -> np.ndarray:
    """The centre square of a uint8 frame, resized to the probe's 224 px (float 0..255)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    crop = frame[(h - side) // 2: (h - side) // 2 + side, (w - side) // 2: (w - side) // 2 + side]
    return np.asarray(Image.fromarray(crop).resize((scenes.SIZE, scenes.SIZE), Image.Resampling.BILINEAR),
                      np.float32)


def video_items(count: int, sequences: int, seed: int = 0) -> list[VideoItem]:
    """``count`` test videos: two events of different colours and shapes (2-4 s each, medium or large objects,
    at least 3 s apart), on background sequences in turn; balanced: the asked object comes first half the time."""
    rng = np.random.default_rng(TEST_SEED + 11 + seed)
    out: list[VideoItem] = []
    while len(out) < count:
        c1, c2 = (str(c) for c in rng.permutation(list(scenes.COLOURS))[:2])
        s1, s2 = (str(s) for s in rng.permutation(list(scenes.SHAPES))[:2])
        d1, d2 = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        a = int(rng.integers(0, VIDEO_SECONDS - d1))
        b = int(rng.integers(0, VIDEO_SECONDS - d2))
        if not (a + d1 + 3 <= b or b + d2 + 3 <= a):
            continue
        things: list[scenes.Thing] = []
        one = scenes.place(things, c1, s1, str(rng.choice(["medium", "large"])), rng)
        two = scenes.place(things, c2, s2, str(rng.choice(["medium", "large"])), rng)
        if one is None or two is None:
            continue
        named = (c1, c2) if rng.uniform() < 0.5 else (c2, c1)
        out.append(VideoItem(len(out) % sequences, (Event(one, a, d1), Event(two, b, d2)),
                             scenes.Question("when", scenes.when_question(c1, s1), f"{a}-{a + d1 - 1}"),
                             scenes.Question("order", scenes.order_question(*named), c1 if a < b else c2)))
    return out


def event_frames(item: VideoItem, sequence: list[np.ndarray], seed: int = 0) -> dict[int, np.ndarray]:
    """The frames of ``item`` that show an object (second -> uint8 picture); the others are the background's."""
    rng = np.random.default_rng(seed)
    out = {}
    for event in item.events:
        for t in range(event.start, event.start + event.duration):
            out[t] = np.clip(scenes.draw(sequence[t], [event.thing], rng) + 0.5, 0, 255).astype(np.uint8)
    return out


def when_right(said: str, answer: str) -> bool:
    """A "when" answer is right when its number is a second the object is visible (answer "a-b": seconds a..b)."""
    low, high = (int(x) for x in answer.split("-"))
    return said.isdigit() and low <= int(said) <= high


def full_frames(count: int = 8) -> list[int]:
    """The seconds ``count`` evenly spread frames take from the video (the middle of each equal part)."""
    return [int((k + 0.5) * VIDEO_SECONDS / count) for k in range(count)]


def frames_showing(item: VideoItem, count: int = 8) -> list[int]:
    """:func:`full_frames`, with the frame nearest each event's middle second moved onto it: ``count`` frames that
    show both events (an oracle for the video bench's ceiling, not a way to sample)."""
    picked = full_frames(count)
    moved: set[int] = set()
    for event in item.events:
        middle = event.start + (event.duration - 1) // 2
        nearest = min((k for k in range(count) if k not in moved), key=lambda k: abs(picked[k] - middle))
        picked[nearest] = middle
        moved.add(nearest)
    return sorted(set(picked))


def stack(parts: Sequence[EncodedImages]) -> EncodedImages:
    """One-frame encodings as one encoded video (their timestamps and indices are the caller's to set)."""
    return EncodedImages(torch.cat([p.hidden for p in parts]), torch.cat([p.scores for p in parts]),
                         torch.cat([p.keys for p in parts]), parts[0].cls_token, parts[0].grid, 1,
                         meta=dict(parts[0].meta))


def video_condition(vlm: VisionLanguageModel, frames: Sequence[EncodedImages], seconds: Sequence[int], method: str,
                    k: int | None, budget: int | None = None) -> CompressedVideo:
    """One-frame encodings shown at ``seconds``, as a video compressed the ``method`` way to ``k`` tokens per frame
    (VisionZip's split; "full": every token), fit to ``budget`` visual tokens by the temporal stage when given,
    labelled for ``vlm``: what the video bench and the video test ask."""
    encoder = vlm.video_encoder()
    video_in = stack(frames)
    video_in.timestamps, video_in.indices = [float(t) for t in seconds], [int(t) for t in seconds]
    if method == "full":
        video = compress_encoded(encoder, video_in, dominant=0, contextual=0, method="full", keep_maps=False)
    else:
        assert k is not None
        dominant, contextual = split_tokens(k)
        video = compress_encoded(encoder, video_in, dominant=dominant, contextual=contextual, method=method,
                                 keep_maps=False)
        if budget is not None:
            video = fit(video, Temporal(), budget, width=encoder.width)
    label_tokens(vlm, video)
    return video


def encode_sequences(encoder: object, sequences: Sequence[tuple[str, list[np.ndarray]]],
                     batch: int = 32) -> list[list[EncodedImages]]:
    """Each background sequence's frames encoded once, as one-frame encodings."""
    out = []
    for _name, seq in sequences:
        images = torch.from_numpy(np.stack([np.clip(f + 0.5, 0, 255).astype(np.uint8) for f in seq]))
        whole = encoder.encode(images, batch_size=batch)  # type: ignore[attr-defined]
        out.append([single(whole, t) for t in range(len(seq))])
    return out


def video_frames(encoder: object, item: VideoItem, sequence: list[np.ndarray], background: list[EncodedImages],
                 seed: int = 0, batch: int = 32) -> list[EncodedImages]:
    """The test video ``item`` as one-frame encodings, second by second: its background's (encoded once by
    :func:`encode_sequences`), with the seconds that show an event encoded here."""
    shown = event_frames(item, sequence, seed=seed)
    seconds = sorted(shown)
    events = encoder.encode(torch.from_numpy(np.stack([shown[t] for t in seconds])),  # type: ignore[attr-defined]
                            batch_size=batch)
    frames = list(background)
    for j, t in enumerate(seconds):
        frames[t] = single(events, j)
    return frames
