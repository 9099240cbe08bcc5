"""Video sampling benchmark (run by hand; not a test).

    python bench/bench_video.py                # full run: 10-minute 30 fps H.264 clip, all backends
    python bench/bench_video.py --minutes 1    # quicker

Prints, for a generated 10-minute 30 fps H.264 clip (640x360, keyframe every 2 s, B-frames):
  - time to sample 8, 32, 128 frames (uniform plan) per backend, against decoding every frame;
  - peak memory of iter_video (chunks of 32) against sample_video for a 1 fps plan over the whole clip.
Writes bench/results/video_sampling.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from comfy_visionzip import iter_video, sample_video  # noqa: E402
from comfy_visionzip.testing.synthetic import make_clip  # noqa: E402
from comfy_visionzip.video import BACKENDS, get_index  # noqa: E402
from comfy_visionzip.video.backends import backend_available  # noqa: E402


def clip_path(minutes: float) -> str:
    cache = Path(os.environ.get("VISIONZIP_BENCH_CACHE", "/tmp/visionzip-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"h264_{minutes:g}min_30fps_640x360.mp4"
    if not path.exists():
        t = time.perf_counter()
        frames = int(minutes * 60 * 30)
        make_clip(str(path) + ".tmp.mp4", frames=frames, fps=30, size=(640, 360),
                  options={"preset": "veryfast", "g": "60", "bf": "2"})
        os.replace(str(path) + ".tmp.mp4", path)
        print(f"generated {path} ({frames} frames) in {time.perf_counter() - t:.0f} s", flush=True)
    return str(path)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_everything(path: str) -> int:
    count = 0
    for chunk in iter_video(path, every=1, chunk_size=64):
        count += len(chunk)
    return count


def memory_child(path: str, mode: str) -> None:
    """Run in a fresh process: peak RSS of one sampling call (ru_maxrss), printed as JSON."""
    import resource
    import tracemalloc

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()  # numpy registers its buffers with tracemalloc: frame memory is counted exactly
    frames = 0
    if mode == "iter":
        for chunk in iter_video(path, fps=1.0, chunk_size=32):
            frames += len(chunk)
    else:
        frames = len(sample_video(path, fps=1.0))
    traced_peak = tracemalloc.get_traced_memory()[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "frames": frames, "base_mib": base / 1024, "peak_mib": peak / 1024,
                      "traced_peak_mib": traced_peak / 2**20}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--memory-child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0

    path = clip_path(args.minutes)
    t_index = timed(lambda: get_index(path))
    index = get_index(path)
    print(f"clip: {index.frame_count} frames, {index.duration:.0f} s, {len(index.keyframes)} keyframes; "
          f"index (demux, no decode) {t_index:.2f} s", flush=True)

    rows = []
    t_all = timed(lambda: decode_everything(path))
    print(f"decode every frame (pyav, iter_video chunks of 64): {t_all:.1f} s", flush=True)
    for backend in [b for b in args.backends.split(",") if b]:
        if not backend_available(backend):
            print(f"{backend}: not installed, skipped")
            continue
        for n in (8, 32, 128):
            seconds = timed(lambda n=n, backend=backend: sample_video(path, num_frames=n, backend=backend))
            rows.append({"backend": backend, "frames": n, "seconds": seconds, "vs_decode_all": seconds / t_all})
            print(f"{backend:>7} {n:>4} frames: {seconds:7.2f} s  ({seconds / t_all:6.1%} of decoding everything)",
                  flush=True)

    memory = []
    for mode in ("iter", "sample"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", path, mode],
                             capture_output=True, text=True, check=True)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
        m = memory[-1]
        print(f"memory {mode:>6}: {m['frames']} frames at 1 fps, "
              f"peak Python/numpy allocations {m['traced_peak_mib']:.0f} MiB, "
              f"peak RSS {m['peak_mib']:.0f} MiB (after imports {m['base_mib']:.0f} MiB)", flush=True)

    result = {
        "clip": {"path": path, "frames": index.frame_count, "seconds": index.duration, "size": "640x360",
                 "codec": index.codec, "keyframes": len(index.keyframes)},
        "index_seconds": t_index,
        "decode_all_seconds": t_all,
        "sampling": rows,
        "memory": memory,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "video_sampling.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Video sampling benchmark",
        "",
        f"Command: `python bench/bench_video.py --minutes {args.minutes:g}`; machine: {result['machine']}.",
        f"Clip: generated H.264 MP4, {index.frame_count} frames (30 fps, {index.duration:.0f} s), 640x360, "
        f"keyframe every 2 s, B-frames. Index (demux only): {t_index:.2f} s. Decoding every frame: {t_all:.1f} s.",
        "",
        "| backend | frames | seconds | share of decoding everything |",
        "|---|---|---|---|",
        *[f"| {r['backend']} | {r['frames']} | {r['seconds']:.2f} | {r['vs_decode_all']:.1%} |" for r in rows],
        "",
        "| memory (1 fps over the clip) | frames | peak traced allocations MiB | peak RSS MiB "
        "| RSS after imports MiB |",
        "|---|---|---|---|---|",
        *[f"| {m['mode']}_video | {m['frames']} | {m['traced_peak_mib']:.0f} | {m['peak_mib']:.0f} | "
          f"{m['base_mib']:.0f} |" for m in memory],
        "",
        "One 640x360 RGB frame is 0.66 MiB: iter_video (chunks of 32) holds one chunk, sample_video the whole clip.",
        "",
    ]
    (out_dir / "video_sampling.md").write_text("\n".join(lines))
    print(f"wrote {out_dir / 'video_sampling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
