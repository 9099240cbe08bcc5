"""Projector tuning (comfy_visionzip.tune) on the probe model: accuracy at 10% and 20% of the tokens before and
after tuning, for VisionZip and, with the same tuning budget, pool and uniform; self-distilled (no labels) and,
as a control, supervised on the probe's own answers (run by hand; not a test).

    python -m comfy_visionzip fetch-weights && python -m comfy_visionzip train-probe   # once
    python bench/bench_tune.py [--pictures 120] [--steps 3000] [--batch 4] [--lr 1e-4] [--per-task 300] [--ks 25,49]

Tuning data: pictures (coloured shapes on frames of the training clips and generated textures; a seed stream of
their own, so neither the probe's training pictures nor the test's backgrounds). The self-distilled adapters see
the pictures and the probe's question forms as prompts, with no answers: the teacher (the probe with full
tokens) writes them. The supervised control sees the same pictures with the true answers to up to two of the
probe's questions per task. Every adapter gets the same ``--steps`` of ``--batch`` samples through
`tune_projector`, as `python -m comfy_visionzip tune-projector` runs it. What to distil (the teacher's answer
positions, or every text position after the visual tokens) is compared on VisionZip at the smallest K and
chosen on validation questions (training backgrounds); the better one tunes the rest.

Evaluation: the fidelity bench's held-out test questions (backgrounds the probe and the tuning never saw),
answered through Chat; accuracy per task and chance-corrected retention against full tokens with the model's
own projector, with paired bootstrap 95% intervals; and full tokens forced through the adapters (the pack sends
full tokens through the model's own projector, so an adapter cannot change them there; this measures what the
tuning alone would do). Writes bench/results/tune.json / .md.
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


def tuning_set(folder: Path, count: int) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """``count`` tuning pictures, and the probe's own questions and answers about each (used only by the supervised
    control: the self-distilled adapters see the pictures alone)."""
    world = scenes.World(footage.training_photos(None, every=2), TUNE_SEED)
    rng = np.random.default_rng(TUNE_SEED)
    paths, labels = [], {}
    for i in range(count):
        scene, questions = world.training_scene()
        path = folder / f"tune-{i:04d}.png"
        Image.fromarray(world.make(scene)).save(path)
        paths.append(str(path))
        by_task: dict[str, list[scenes.Question]] = {}
        for q in questions:
            by_task.setdefault(q.task, []).append(q)
        labels[str(path)] = [(q.text, q.answer) for qs in by_task.values()
                             for q in (qs[j] for j in rng.permutation(len(qs))[:2])]
    return paths, labels


def encode_items(encoder, items) -> list:
    out = []
    for i in range(0, len(items), 32):
        chunk = items[i: i + 32]
        encoded = encoder.encode(torch.from_numpy(np.stack([image for _s, _q, image in chunk])), batch_size=32)
        out += [fidelity.single(encoded, j) for j in range(len(chunk))]
    return out


def validation_items(per_task: int) -> list:
    """Balanced questions on the training backgrounds (a seed stream of their own): what the choice of distilled
    positions is made on, so the test questions only ever measure."""
    world = scenes.World(footage.training_photos(None, every=2), TUNE_SEED + 1)
    items = []
    for task in scenes.TASKS:
        for _ in range(per_task):
            scene, question = world.item(task)
            items.append((scene, question, world.make(scene)))
    return items


def evaluate(vlm, items, encoded_items, condition: str, adapter: str | None, forced: bool = False) -> np.ndarray:
    """Accuracy per question; ``forced``: every token through the adapter's projector, also full ones (the pack
    sends full tokens through the model's own projector, so this measures what the tuning did to it there)."""
    apply_adapter(vlm, adapter)
    if forced:
        vlm.projector_for = lambda method: vlm.projector  # this instance only, undone below
    method, _, k = condition.partition("@")
    right = []
    for (_scene, question, _image), one in zip(items, encoded_items):
        video = fidelity.condition(vlm, one, method, int(k) if k else None)
        right.append(fidelity.ask(vlm, video, question.text) == question.answer)
    apply_adapter(vlm, None)
    vars(vlm).pop("projector_for", None)
    return np.array(right, dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=120)
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps per adapter (the same budget for "
                        "every method and for the supervised control)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--per-task", type=int, default=300)
    parser.add_argument("--validation", type=int, default=40, help="validation questions per task (choosing "
                        "the distilled positions)")
    parser.add_argument("--ks", default="25,49")
    parser.add_argument("--positions", default="answer,all",
                        help="distilled positions compared on the first method at the smallest K (one: no comparison)")
    parser.add_argument("--methods", default="visionzip,pool,uniform")
    parser.add_argument("--supervised", default="visionzip,pool,uniform",
                        help="methods that also get the supervised control ('' for none)")
    parser.add_argument("--lr", type=float, default=1e-4, help="(the command line's default; tune.md was made "
                        "with --lr 1e-3 --batch 8 --steps 1500)")
    parser.add_argument("--anchor", type=float, default=TuneSettings.anchor,
                        help="share of each step's samples read from the full tokens (0: the first run's setting)")
    parser.add_argument("--name", default="tune", help="the results' file name (bench/results/NAME.json / .md)")
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
    supervised = [m for m in args.supervised.split(",") if m]
    prompts = scenes.question_forms(TUNE_SEED)  # the probe folder's prompts.txt
    photos, clips = footage.test_photos(every=2)
    items = list(fidelity.test_items(photos, args.per_task))
    encoded_items = encode_items(encoder, items)
    checks = validation_items(args.validation)
    encoded_checks = encode_items(encoder, checks)
    tasks = [q.task for _s, q, _i in items]
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    pictures, labels = tuning_set(work, args.pictures)
    adapters: dict[str, dict] = {}

    def tune(method: str, k: int, kind: str) -> str:
        name = f"{method}@{k} {kind}"
        positions = "answer" if kind == "supervised" else kind.split(":")[1]
        settings = TuneSettings(tokens_per_frame=k, method=method, minutes=24 * 60, steps=args.steps,
                                prompts=prompts, answer_tokens=2, positions=positions, lr=args.lr, batch=args.batch,
                                top_k=32, anchor=args.anchor)
        result = tune_projector(vlm, pictures, work / f"{method}{k}-{kind.replace(':', '-')}.safetensors",
                                settings=settings, resume=False, labels=labels if kind == "supervised" else None,
                                say=lambda line: print(f"[{name}] {line}", flush=True))
        adapters[name] = {"path": result.path, "steps": result.steps, "seconds": round(result.seconds, 1),
                          "samples": result.adapter.data["samples"], "held_out_before": result.held_out_before,
                          "held_out_after": result.held_out_after}
        return result.path

    acc: dict[str, np.ndarray] = {"full": evaluate(vlm, items, encoded_items, "full", None)}
    print(f"full: {acc['full'].mean():.3f}", flush=True)
    first = f"{methods[0]}@{ks[0]}"
    validation: dict[str, float] = {}
    for positions in args.positions.split(","):
        path = tune(methods[0], ks[0], f"distilled:{positions}")
        validation[positions] = float(evaluate(vlm, checks, encoded_checks, first, path).mean())
        acc[f"{first} distilled:{positions}"] = evaluate(vlm, items, encoded_items, first, path)
        print(f"{first} distilled ({positions}): validation {validation[positions]:.3f}, test "
              f"{acc[f'{first} distilled:{positions}'].mean():.3f}", flush=True)
    best = max(validation, key=lambda p: validation[p])
    print(f"distilling at '{best}' positions (better on validation) tunes the rest", flush=True)
    for k in ks:
        for method in methods:
            condition = f"{method}@{k}"
            acc[condition] = evaluate(vlm, items, encoded_items, condition, None)
            key = f"{condition} distilled:{best}"
            if key not in acc:
                acc[key] = evaluate(vlm, items, encoded_items, condition, tune(method, k, f"distilled:{best}"))
            line = f"{condition}: {acc[condition].mean():.3f} -> distilled {acc[key].mean():.3f}"
            if method in supervised:
                acc[f"{condition} supervised"] = evaluate(vlm, items, encoded_items, condition,
                                                          tune(method, k, "supervised"))
                line += f", supervised {acc[f'{condition} supervised'].mean():.3f}"
            print(line, flush=True)
    # what the tuning does at full tokens when they are forced through it (the pack itself sends them through the
    # model's own projector): every VisionZip adapter and the first supervised one
    for name in [f"{methods[0]}@{k} distilled:{best}" for k in ks] + [f"{first} supervised"]:
        if name in adapters:
            label = f"full forced through the {name} adapter"
            acc[label] = evaluate(vlm, items, encoded_items, "full", adapters[name]["path"], forced=True)
            print(f"{label}: {acc[label].mean():.3f}", flush=True)
    result = summarise(acc, tasks, args, adapters, best, validation, clips, time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def summarise(acc: dict[str, np.ndarray], tasks: list[str], args, adapters, best, validation, clips,
              seconds) -> dict:
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
            "steps_per_adapter": args.steps, "batch": args.batch, "lr": args.lr, "anchor": args.anchor,
            "per_task": args.per_task,
            "test_backgrounds": clips, "positions_kept": best, "validation_accuracy": validation,
            "adapters": adapters, "table": table, "seconds": round(seconds, 1), "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    tasks = list(next(iter(result["table"].values()))["per_task"])
    out = ["# Projector tuning by self-distillation on the probe model\n",
           f"`{result['command']}`: {result['pictures']} tuning pictures, {result['steps_per_adapter']} steps of "
           f"{result['batch']} samples per adapter (of which a share {result.get('anchor', 0)} read the full tokens: "
           f"the anchor), {result['per_task']} held-out questions per task on "
           f"{', '.join(result['test_backgrounds'])}; distilled positions kept: {result['positions_kept']} "
           f"(validation accuracy "
           + ", ".join(f"{k} {v:.3f}" for k, v in result["validation_accuracy"].items())
           + " on training backgrounds)\n",
           "| condition | all | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for name, e in result["table"].items():
        cells = [f"{c['accuracy']:.3f} ({c['retention']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}])"
                 if c["retention"] is not None else f"{c['accuracy']:.3f} (full at chance)"
                 for c in (e["per_task"][t] for t in tasks)]
        out.append(f"| {name} | {e['accuracy']:.3f} | " + " | ".join(cells) + " |")
    out.append("\naccuracy (retention, chance-corrected against full tokens with the model's own projector [95% CI])\n")
    out.append("| adapter | samples | steps | seconds | held-out loss before -> after |\n|---|---|---|---|---|")
    for name, a in result["adapters"].items():
        out.append(f"| {name} | {a['samples']} | {a['steps']} | {a['seconds']} | {a['held_out_before']} -> "
                   f"{a['held_out_after']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
