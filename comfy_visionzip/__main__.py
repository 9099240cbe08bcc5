"""Command line: ``python -m comfy_visionzip {demo,frames} ...``.

demo    runs what the library can do on a generated clip (and the real-world clip in ../shared/media
        when it is there): no download, no GPU.
frames  samples a video file and writes a contact sheet PNG.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from . import VisionZipError, sample_video
from .synthetic import make_clip, read_frame_number
from .video import get_index
from .viz import contact_sheet, save_png

REAL_CLIP_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "media" / "flipping_a_pancake.mkv",  # beside the repo
    Path.cwd().parent / "shared" / "media" / "flipping_a_pancake.mkv",
]


def _describe(clip, label: str) -> None:
    shown = ", ".join(f"{t:.2f}" for t in clip.timestamps[:12]) + (" ..." if len(clip) > 12 else "")
    timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in clip.timings.items())
    print(f"  {label:<28} {len(clip):>4} frames  [{shown}] s")
    print(f"  {'':<28} indices {clip.indices[:12]}{' ...' if len(clip) > 12 else ''}; {timing}")


def _demo_video(path: str, title: str, out_dir: Path, check_numbers: bool) -> Path:
    t = time.perf_counter()
    index = get_index(path)
    probe_ms = (time.perf_counter() - t) * 1000
    w, h = index.display_size
    print(f"\n{title}: {path}")
    print(f"  {index.container_format.split(',')[0]} / {index.codec}, {w}x{h}, {index.frame_count} frames, "
          f"{index.fps:.3f} fps, {index.duration:.2f} s, rotation {index.rotation}, keyframes {len(index.keyframes)}; "
          f"indexed in {probe_ms:.0f} ms (demux only, no decoding)")
    plans = {
        "num_frames=8": dict(num_frames=8),
        "fps=1": dict(fps=1.0),
        "every=45, start=2 s": dict(every=45, start=2.0),
        "fps=4, max_frames=6": dict(fps=4.0, max_frames=6),
    }
    clip = None
    for label, plan in plans.items():
        c = sample_video(path, max_size=480, **plan)
        _describe(c, label)
        if check_numbers:
            seen = [read_frame_number(f.numpy()) for f in c.frames]
            status = "OK" if seen == c.indices else f"MISMATCH {seen}"
            print(f"  {'':<28} frame numbers drawn in the frames: {status}")
        clip = clip or c
    sheet = contact_sheet(clip.frames, [f"#{i} @ {t:.2f}s" for i, t in zip(clip.indices, clip.timestamps)])
    target = out_dir / f"contact_sheet_{Path(path).stem}.png"
    save_png(sheet, target)
    print(f"  contact sheet of num_frames=8 -> {target}")
    return target


def cmd_demo(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("ComfyUI-VisionZip demo: frame sampling (encoder, VisionZip and answering arrive with the next issues)")
    with tempfile.TemporaryDirectory() as tmp:
        generated = os.path.join(tmp, "generated_30s.mkv")
        t = time.perf_counter()
        make_clip(generated, frames=900, fps=30, size=(320, 180), options={"g": "60", "preset": "ultrafast"})
        print(f"\ngenerated a 30 s numbered test clip in {time.perf_counter() - t:.1f} s (MKV: no frame count in the stream)")
        _demo_video(generated, "generated clip", out_dir, check_numbers=True)
    real = next((p for p in REAL_CLIP_CANDIDATES if p.exists()), None)
    if real is not None:
        _demo_video(str(real), "real-world clip", out_dir, check_numbers=False)
    else:
        print("\n(real-world clip ../shared/media/flipping_a_pancake.mkv not found; skipped)")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s; outputs in {out_dir.resolve()}")
    return 0


def cmd_frames(args: argparse.Namespace) -> int:
    clip = sample_video(args.video, num_frames=args.num_frames, fps=args.fps, every=args.every, start=args.start,
                        end=args.end, max_frames=args.max_frames, backend=args.backend, max_size=args.max_size)
    _describe(clip, Path(args.video).name)
    if args.out:
        labels = [f"#{i} @ {t:.2f}s" for i, t in zip(clip.indices, clip.timestamps)]
        print(f"  contact sheet -> {save_png(contact_sheet(clip.frames, labels), args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfy_visionzip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on a generated clip (no download)")
    demo.add_argument("--out", default="out", help="folder for the pictures (default: ./out)")
    demo.set_defaults(func=cmd_demo)
    frames = sub.add_parser("frames", help="sample a video and write a contact sheet")
    frames.add_argument("video")
    mode = frames.add_mutually_exclusive_group()
    mode.add_argument("--num-frames", type=int, help="N frames uniformly over [start, end)")
    mode.add_argument("--fps", type=float, help="frames per second of video")
    mode.add_argument("--every", type=int, help="every n-th frame")
    frames.add_argument("--start", type=float, default=0.0, help="seconds")
    frames.add_argument("--end", type=float, default=None, help="seconds")
    frames.add_argument("--max-frames", type=int, default=None)
    frames.add_argument("--max-size", type=int, default=None, help="longer side in pixels")
    frames.add_argument("--backend", default="auto", help="auto, pyav, decord or opencv")
    frames.add_argument("--out", default=None, help="write a contact sheet PNG here")
    frames.set_defaults(func=cmd_frames)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except VisionZipError as e:  # the user's input: say what is wrong, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
