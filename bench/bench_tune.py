"""Label-free projector tuning (comfy_visionzip.tune) on the probe model: accuracy at 10% and 20% of the tokens
before and after tuning, for VisionZip and, with the same tuning budget, pool and uniform (run by hand; not a test).

    python -m comfy_visionzip fetch-weights && python -m comfy_visionzip train-probe   # once
    python bench/bench_tune.py [--pictures 120] [--minutes 4] [--per-task 300] [--ks 25,49]

Tuning data: unlabeled pictures (coloured shapes on frames of the training clips and generated textures; a
seed stream of its own, so neither the training set's pictures nor the test's backgrounds) and the probe's
question forms as prompts, with no answers: the teacher (the probe with full tokens) writes them. Each adapter
is tuned with `tune_projector` exactly as `python -m comfy_visionzip tune-projector` does, for ``--minutes``.
First the two choices of what to distil (the teacher's answer positions, or every text position after the
visual tokens) are compared on VisionZip at the smallest K; the better one tunes the rest.

Evaluation: the fidelity bench's held-out test questions (backgrounds the probe and the tuning never saw),
answered through Chat; accuracy per task and chance-corrected retention against full tokens with the model's
own projector, with paired bootstrap 95% intervals; and full tokens with the VisionZip adapter (tuning must
not hurt there). Writes bench/results/tune.json / .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from comfy_visionzip import load_vlm  # noqa: E402
from comfy_visionzip.adapter import apply_adapter  # noqa: E402
from comfy_visionzip.probe import fidelity, footage, scenes  # noqa: E402
from comfy_visionzip.probe.train import find_probe  # noqa: E402
from comfy_visionzip.tune import TuneSettings, tune_projector  # noqa: E402

MEANINGFUL = 0.1  # retention is reported for tasks whose full-token accuracy is at least this far above chance
TUNE_SEED = 31_337  # the tuning pictures' seed stream (training: the build seed; validation +10000; test 20000)


def probe_prompts(rng: np.random.Generator) -> tuple[str, ...]:
    """Questions of every form the probe knows (no answers): 20 of them."""
    colours, shapes = list(scenes.COLOURS), list(scenes.SHAPES)
    out = [f"What color is the {s}?" for s in shapes] + [f"What shape is the {c} object?" for c in colours]
    out += ["How many objects are there?", "What is the background?", "Is the picture dark or bright?"]
    pairs = [(c, s) for c in colours for s in shapes]
    out += [f"Is there a {c} {s}?" for c, s in (pairs[i] for i in rng.permutation(len(pairs))[:6])]
    for axis in ("left of", "above"):
        for _ in range(2):
            a, b = (str(x) for x in rng.permutation(colours)[:2])
            out.append(f"Is the {a} object {axis} the {b} object?")
    return tuple(out)


def tuning_pictures(folder: Path, count: int) -> list[str]:
    world = scenes.World(footage.training_photos(None, every=2), TUNE_SEED)
    paths = []
    for i in range(count):
        scene, _questions = world.training_scene()  # the questions are thrown away: no labels
        path = folder / f"tune-{i:04d}.png"
        Image.fromarray(world.make(scene)).save(path)
        paths.append(str(path))
    return paths


def evaluate(vlm, items, encoded_items, condition: str, adapter: str | None) -> np.ndarray:
    apply_adapter(vlm, adapter)
    method, _, k = condition.partition("@")
    right = []
    for (_scene, question, _image), one in zip(items, encoded_items):
        video = fidelity.condition(vlm, one, method, int(k) if k else None)
        right.append(fidelity.ask(vlm, video, question.text) == question.answer)
    apply_adapter(vlm, None)
    return np.array(right, dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=120)
    parser.add_argument("--minutes", type=float, default=4.0, help="tuning time per adapter")
    parser.add_argument("--per-task", type=int, default=300)
    parser.add_argument("--ks", default="25,49")
    parser.add_argument("--methods", default="visionzip,pool,uniform")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    folder = find_probe()
    if folder is None:
        sys.exit("no probe model: run `python -m comfy_visionzip train-probe` first")
    started = time.perf_counter()
    vlm = load_vlm(folder, device="cpu", dtype="float32")
    encoder = vlm.video_encoder()
    ks = [int(k) for k in args.ks.split(",")]
    methods = args.methods.split(",")
    prompts = probe_prompts(np.random.default_rng(TUNE_SEED))
    photos, clips = footage.test_photos(every=2)
    items = list(fidelity.test_items(photos, args.per_task))
    encoded_items = []
    for i in range(0, len(items), 32):
        chunk = items[i: i + 32]
        encoded = encoder.encode(torch.from_numpy(np.stack([image for _s, _q, image in chunk])), batch_size=32)
        encoded_items += [fidelity.single(encoded, j) for j in range(len(chunk))]
    tasks = [q.task for _s, q, _i in items]
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    pictures = tuning_pictures(work, args.pictures)
    adapters: dict[str, dict] = {}

    def tune(method: str, k: int, positions: str) -> str:
        name = f"{method}@{k}:{positions}"
        settings = TuneSettings(tokens_per_frame=k, method=method, minutes=args.minutes, prompts=prompts,
                                answer_tokens=2, positions=positions, lr=args.lr, batch=8, top_k=32)
        result = tune_projector(vlm, pictures, work / f"{method}{k}-{positions}.safetensors", settings=settings,
                                resume=False, say=lambda line: print(f"[{name}] {line}", flush=True))
        adapters[name] = {"path": result.path, "steps": result.steps, "seconds": round(result.seconds, 1),
                          "held_out_before": result.held_out_before, "held_out_after": result.held_out_after}
        return result.path

    acc: dict[str, np.ndarray] = {"full": evaluate(vlm, items, encoded_items, "full", None)}
    print(f"full: {acc['full'].mean():.3f}", flush=True)
    first = f"{methods[0]}@{ks[0]}"
    for positions in ("answer", "all"):
        path = tune(methods[0], ks[0], positions)
        acc[f"{first} tuned:{positions}"] = evaluate(vlm, items, encoded_items, first, path)
        print(f"{first} tuned ({positions}): {acc[f'{first} tuned:{positions}'].mean():.3f}", flush=True)
    best = max(("answer", "all"), key=lambda p: acc[f"{first} tuned:{p}"].mean())
    print(f"distilling at '{best}' positions tunes the rest", flush=True)
    for k in ks:
        for method in methods:
            condition = f"{method}@{k}"
            acc[condition] = evaluate(vlm, items, encoded_items, condition, None)
            key = f"{condition} tuned:{best}"
            if key not in acc:
                acc[key] = evaluate(vlm, items, encoded_items, condition, tune(method, k, best))
            print(f"{condition}: {acc[condition].mean():.3f} -> tuned {acc[key].mean():.3f}", flush=True)
    acc[f"full with the {first} adapter"] = evaluate(vlm, items, encoded_items, "full",
                                                     adapters[f"{first}:{best}"]["path"])
    result = summarise(acc, tasks, args, adapters, best, clips, time.perf_counter() - started)
    out = Path(args.out)
    (out / "tune.json").write_text(json.dumps(result, indent=2))
    (out / "tune.md").write_text(markdown(result))
    print(markdown(result))


def summarise(acc: dict[str, np.ndarray], tasks: list[str], args, adapters, best, clips, seconds) -> dict:
    rng = np.random.default_rng(12345)
    task_names = list(dict.fromkeys(tasks))
    index = {t: np.array([i for i, x in enumerate(tasks) if x == t]) for t in task_names}
    boots = {t: rng.integers(0, len(ix), (args.boot, len(ix))) for t, ix in index.items()}
    full = acc["full"]
    table = {}
    for name, right in acc.items():
        per_task = {}
        for t in task_names:
            ix = index[t]
            chance = scenes.CHANCE[t]
            a, f = right[ix], full[ix]
            entry: dict = {"accuracy": round(float(a.mean()), 4), "retention": None, "ci": None}
            if f.mean() - chance >= MEANINGFUL:  # retention of what the model does not know is noise over ~0
                ret = (a.mean() - chance) / (f.mean() - chance)
                rb = (a[boots[t]].mean(1) - chance) / np.maximum(f[boots[t]].mean(1) - chance, 1e-9)
                entry.update(retention=round(float(ret), 3), ci=np.round(np.percentile(rb, [2.5, 97.5]), 3).tolist())
            per_task[t] = entry
        table[name] = {"accuracy": round(float(right.mean()), 4), "per_task": per_task}
    return {"command": "python bench/bench_tune.py " + " ".join(sys.argv[1:]), "pictures": args.pictures,
            "minutes_per_adapter": args.minutes, "per_task": args.per_task, "test_backgrounds": clips,
            "positions_kept": best, "adapters": adapters, "table": table, "seconds": round(seconds, 1),
            "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    tasks = list(next(iter(result["table"].values()))["per_task"])
    out = ["# Projector tuning by self-distillation on the probe model\n",
           f"`{result['command']}`: {result['pictures']} unlabeled tuning pictures, {result['minutes_per_adapter']} "
           f"min per adapter, {result['per_task']} held-out questions per task on "
           f"{', '.join(result['test_backgrounds'])}"
           f"; distilled positions kept: {result['positions_kept']}\n",
           "| condition | all | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for name, e in result["table"].items():
        cells = [f"{c['accuracy']:.3f} ({c['retention']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}])"
                 if c["retention"] is not None else f"{c['accuracy']:.3f} (full at chance)"
                 for c in (e["per_task"][t] for t in tasks)]
        out.append(f"| {name} | {e['accuracy']:.3f} | " + " | ".join(cells) + " |")
    out.append("\naccuracy (retention, chance-corrected against full tokens with the model's own projector [95% CI])\n")
    out.append("| adapter | steps | seconds | held-out distillation loss before -> after |\n|---|---|---|---|")
    for name, a in result["adapters"].items():
        out.append(f"| {name} | {a['steps']} | {a['seconds']} | {a['held_out_before']} -> {a['held_out_after']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
