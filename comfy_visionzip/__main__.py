"""Command line: ``python -m comfy_visionzip {demo,ask,frames,bench} ...``.

demo    the whole pipeline on a generated clip (and the real-world clip in ../shared/media when it is
        there) with a tiny random-weight LLaVA: sampling, encoding with attention, VisionZip, answering
        and a cached follow-up. No download, no GPU.
ask     ask a LLaVA-family checkpoint about a video.
frames  sample a video file and write a contact sheet PNG.
bench   run a benchmark from bench/ (video, encoder, prefill).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import VisionZipError, frames_for_budget, sample_video
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
    import transformers

    transformers.utils.logging.disable_progress_bar()  # this process only: keep the demo's output readable
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("ComfyUI-VisionZip demo: frame sampling, the encoder with attention, VisionZip, answering with a KV cache")
    with tempfile.TemporaryDirectory() as tmp:
        generated = os.path.join(tmp, "generated_30s.mkv")
        t = time.perf_counter()
        make_clip(generated, frames=900, fps=30, size=(320, 180), options={"g": "60", "preset": "ultrafast"})
        print(f"\ngenerated a 30 s numbered test clip in {time.perf_counter() - t:.1f} s (MKV: no frame count in the stream)")
        _demo_video(generated, "generated clip", out_dir, check_numbers=True)
        _demo_pipeline(generated, out_dir, tmp)
    real = next((p for p in REAL_CLIP_CANDIDATES if p.exists()), None)
    if real is not None:
        _demo_video(str(real), "real-world clip", out_dir, check_numbers=False)
    else:
        print("\n(real-world clip ../shared/media/flipping_a_pancake.mkv not found; skipped)")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s; outputs in {out_dir.resolve()}")
    return 0


def _tokens_per_frame(vlm, path: str, per_image: int) -> int:
    """Visual tokens one frame of ``path`` costs with this model (anyres models see several crops)."""
    from .encoder import select_best_resolution

    spec = vlm.video_encoder().preprocess_spec
    crops = 1
    if spec.pinpoints:
        width, height = get_index(path).display_size
        rows, cols = (side // spec.tile for side in select_best_resolution(height, width, spec.pinpoints))
        crops = 1 + rows * cols
    extra = 1 if vlm.family.model_type == "llava_next" else 0  # a newline token per frame
    return crops * per_image + extra


def cmd_ask(args: argparse.Namespace) -> int:
    from .answer import Chat, GenerationConfig
    from .store import load_tokens, save_tokens
    from .vlm import compress_video, load_vlm
    from .zip import split_tokens

    times: dict[str, float] = {}
    t = time.perf_counter()
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    times["load model"] = time.perf_counter() - t
    dominant, contextual = (split_tokens(args.tokens_per_frame) if args.tokens_per_frame
                            else (args.dominant, args.contextual))
    t = time.perf_counter()
    if args.tokens:
        video = load_tokens(args.tokens, model=vlm)
        times["load tokens"] = time.perf_counter() - t
    else:
        num_frames, fps = args.frames, args.fps
        if args.budget:
            per_frame = _tokens_per_frame(vlm, args.video, dominant + contextual)
            num_frames = frames_for_budget(args.budget, per_frame)
            print(f"budget {args.budget} tokens at {per_frame} per frame: {num_frames} frames")
        if num_frames is None and fps is None:
            num_frames = 16
        video = compress_video(vlm, args.video, num_frames=num_frames, fps=fps, max_frames=args.max_frames,
                               dominant=dominant, contextual=contextual, method=args.method, batch_size=args.batch_size,
                               progress=_progress_bar(args))
        times["sample + encode + zip"] = time.perf_counter() - t
        if args.save_tokens:
            print(f"tokens saved to {save_tokens(video, args.save_tokens)}")
    chat = Chat(vlm, video, timestamps=not args.no_timestamps)
    times["project"] = chat.project_seconds
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    print(f"{video.summary()}\nvisual tokens in the prompt: {chat.visual.shape[0]}")
    for question in [args.question, *args.follow_up]:
        print(f"\nQ: {question}\nA: ", end="", flush=True)
        chat.ask(question, config, on_text=lambda text: print(text, end="", flush=True))
        turn = chat.turns[-1]
        print(f"\n   ({turn.new_tokens} tokens generated; prefilled {turn.prefill_tokens}, reused {turn.cached_tokens} "
              f"from the cache; prefill {turn.seconds['prefill'] * 1000:.0f} ms, generate {turn.seconds['generate'] * 1000:.0f} ms)")
    print("\ntimings: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    return 0


def _progress_bar(args):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="encoding frames", unit="frame", leave=False)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return progress


def _demo_pipeline(clip_path: str, out_dir: Path, tmp: str) -> None:
    from .answer import Chat, GenerationConfig
    from .encoder import kept_count
    from .tiny import build_tiny
    from .viz import attention_overlays, token_overlays
    from .vlm import compress_video, load_vlm

    print("\nVisionZip pipeline with a tiny random-weight LLaVA-1.5 (built here, saved and loaded like a real one;"
          " its answers are random words: the point is the mechanics)")
    t = time.perf_counter()
    vlm = load_vlm(build_tiny("llava", os.path.join(tmp, "tiny-llava"), image_size=112, patch=14), device="cpu")
    encoder = vlm.video_encoder()
    print(f"  model: {vlm.family.display}, vision tower {encoder.num_layers} layers, select layer {encoder.layer_index}, "
          f"{encoder.tokens_per_image} tokens per frame uncompressed; loaded in {time.perf_counter() - t:.1f} s")
    for method, dominant, contextual in (("full", 1, 0), ("visionzip", 14, 3)):
        t = time.perf_counter()
        video = compress_video(vlm, clip_path, fps=1.0, dominant=dominant, contextual=contextual, method=method)
        seconds = time.perf_counter() - t
        chat = Chat(vlm, video)
        config = GenerationConfig(max_new_tokens=12)
        chat.ask("What happens in this video ?", config)
        chat.ask("and then ?", config)
        first, second = chat.turns
        print(f"  {method:<9} {video.num_frames} frames x {video.tokens_per_frame:>2} tokens = {video.total_tokens:>4} visual "
              f"tokens (sample+encode+zip {seconds:.2f} s); answer prefilled {first.prefill_tokens} tokens "
              f"in {first.seconds['prefill'] * 1000:.0f} ms; follow-up prefilled {second.prefill_tokens} "
              f"(reused {second.cached_tokens} from the cache)")
        if method == "visionzip":
            print(f"  answer (random words): {first.answer!r}")
            picks = [0, len(video.indices) // 3, 2 * len(video.indices) // 3, len(video.indices) - 1]
            frames = sample_video(clip_path, frames=[video.indices[p] for p in picks]).frames
            views = encoder.view(frames)
            heat = attention_overlays(views, video.scores[picks], video.grid, cls_token=video.cls_token)
            kept = token_overlays(views, video.assignment[picks], video.grid, cls_token=video.cls_token,
                                  kept=kept_count(video))
            labels = [f"{t:.0f}s attention" for t in (video.timestamps[p] for p in picks)]
            labels += [f"{t:.0f}s kept/merged" for t in (video.timestamps[p] for p in picks)]
            sheet = contact_sheet(np.concatenate([heat, kept]), labels, columns=4, tile_width=160)
            target = save_png(sheet, out_dir / "visionzip_tokens.png")
            print(f"  attention heatmaps and kept/merged tokens -> {target}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one of the repository's benchmarks (bench/bench_<name>.py) with the remaining arguments."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "bench" / f"bench_{args.name}.py"
    if not script.is_file():
        raise VisionZipError(f"{script} not found: benchmarks live in the repository checkout, not in an installed package")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
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
    ask = sub.add_parser("ask", help="ask a LLaVA-family model about a video")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="checkpoint folder (or Hugging Face id where the network allows)")
    plan = ask.add_mutually_exclusive_group()
    plan.add_argument("--frames", type=int, help="frames to sample uniformly (default 16)")
    plan.add_argument("--fps", type=float, help="frames per second of video")
    plan.add_argument("--budget", type=int, help="visual token budget: as many frames as fit")
    ask.add_argument("--max-frames", type=int, default=None)
    ask.add_argument("--dominant", type=int, default=54)
    ask.add_argument("--contextual", type=int, default=10)
    ask.add_argument("--tokens-per-frame", type=int, default=0, help="split into dominant + contextual with the paper's ratio")
    ask.add_argument("--method", default="visionzip", help="visionzip, full, pool or uniform")
    ask.add_argument("--batch-size", type=int, default=8)
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--device", default="auto")
    ask.add_argument("--dtype", default="auto")
    ask.add_argument("--no-timestamps", action="store_true", help="do not tell the model when frames were taken")
    ask.add_argument("--follow-up", action="append", default=[], help="another question (repeatable; reuses the cache)")
    ask.add_argument("--save-tokens", help="save the compressed tokens to this .safetensors file")
    ask.add_argument("--tokens", help="answer from tokens saved earlier instead of encoding the video")
    ask.set_defaults(func=cmd_ask)
    bench = sub.add_parser("bench", help="run a benchmark from bench/ (video, encoder, prefill)")
    bench.add_argument("name", choices=["video", "encoder", "prefill"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark, e.g. --device cuda")
    bench.set_defaults(func=cmd_bench)
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
