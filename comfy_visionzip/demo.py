"""The demo (``python -m comfy_visionzip demo``): the whole pipeline with no download and no GPU.

It generates a numbered test clip (and uses the real-world clip in ../shared/media when it is there),
samples it with several plans, builds tiny random-weight LLaVA, Qwen2.5-VL and Qwen3-VL checkpoints
saved and loaded like real ones, encodes with attention, compresses with VisionZip, answers and asks a
cached follow-up, and draws the real DINOv2's attention when its weights are fetched.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from .answer import Chat, GenerationConfig, Turn
from .errors import VisionZipError
from .models import VisionLanguageModel
from .pipeline import compress_encoded, compress_video
from .probe.fidelity import square
from .probe.scenes import Thing, draw
from .probe.train import find_probe
from .testing.synthetic import make_clip, read_frame_number
from .testing.tiny import build_tiny
from .tokens import CompressedVideo, kept_count
from .video import VideoClip, get_index, sample_video
from .viz import attention_overlays, contact_sheet, enlarge, save_png, token_overlays, with_legend
from .vlm import load_tower, load_vlm
from .weights import find_real_tower

Say = Callable[[str], None]  # where the demo's report goes, a line at a time

REAL_CLIP_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "media" / "flipping_a_pancake.mkv",  # beside the repo
    Path.cwd().parent / "shared" / "media" / "flipping_a_pancake.mkv",
]

def _describe(say: Say, clip: VideoClip, label: str) -> None:
    shown = ", ".join(f"{t:.2f}" for t in clip.timestamps[:12]) + (" ..." if len(clip) > 12 else "")
    timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in clip.timings.items())
    say(f"  {label:<28} {len(clip):>4} frames  [{shown}] s")
    say(f"  {'':<28} indices {clip.indices[:12]}{' ...' if len(clip) > 12 else ''}; {timing}")


def _demo_video(say: Say, path: str, title: str, out_dir: Path, check_numbers: bool) -> Path:
    t = time.perf_counter()
    index = get_index(path)
    probe_ms = (time.perf_counter() - t) * 1000
    w, h = index.display_size
    say(f"\n{title}: {path}")
    say(f"  {index.container_format.split(',')[0]} / {index.codec}, {w}x{h}, {index.frame_count} frames, "
          f"{index.fps:.3f} fps, {index.duration:.2f} s, rotation {index.rotation}, keyframes {len(index.keyframes)}; "
          f"indexed in {probe_ms:.0f} ms (demux only, no decoding)")
    plans: dict[str, dict[str, Any]] = {
        "num_frames=8": dict(num_frames=8),
        "fps=1": dict(fps=1.0),
        "every=45, start=2 s": dict(every=45, start=2.0),
        "fps=4, max_frames=6": dict(fps=4.0, max_frames=6),
    }
    clip: VideoClip | None = None
    for label, plan in plans.items():
        c = sample_video(path, max_size=480, **plan)
        _describe(say, c, label)
        if check_numbers:
            seen = [read_frame_number(f.numpy()) for f in c.frames]
            status = "OK" if seen == c.indices else f"MISMATCH {seen}"
            say(f"  {'':<28} frame numbers drawn in the frames: {status}")
        clip = clip or c
    if clip is None:
        raise VisionZipError(f"{path}: no frames sampled")
    sheet = contact_sheet(clip.frames, [f"#{i} @ {t:.2f}s" for i, t in zip(clip.indices, clip.timestamps)])
    target = out_dir / f"contact_sheet_{Path(path).stem}.png"
    save_png(sheet, target)
    say(f"  contact sheet of num_frames=8 -> {target}")
    return target


def run_demo(out: str | Path, say: Say) -> int:
    """Run the demo, writing its pictures into ``out`` and its report line by line to ``say`` (the command
    line passes print); returns the exit code (0)."""
    transformers.utils.logging.disable_progress_bar()  # this process only: keep the demo's output readable
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say("ComfyUI-VisionZip demo: frame sampling, the encoder with attention, VisionZip, answering with a KV cache")
    with tempfile.TemporaryDirectory() as tmp:
        generated = os.path.join(tmp, "generated_30s.mkv")
        t = time.perf_counter()
        make_clip(generated, frames=900, fps=30, size=(320, 180), options={"g": "60", "preset": "ultrafast"})
        say(f"\ngenerated a 30 s numbered test clip in {time.perf_counter() - t:.1f} s "
              "(MKV: no frame count in the stream)")
        _demo_video(say, generated, "generated clip", out_dir, check_numbers=True)
        _demo_pipeline(say, generated, out_dir, tmp)
        _demo_qwen(say, generated, tmp)
    real = next((p for p in REAL_CLIP_CANDIDATES if p.exists()), None)
    if real is not None:
        _demo_video(say, str(real), "real-world clip", out_dir, check_numbers=False)
    else:
        say("\n(real-world clip ../shared/media/flipping_a_pancake.mkv not found; skipped)")
    _demo_real_attention(say, str(real) if real is not None else generated_fallback(out_dir), out_dir)
    _demo_probe(say, str(real) if real is not None else generated_fallback(out_dir), out_dir)
    say(f"\ndone in {time.perf_counter() - t0:.1f} s; outputs in {out_dir.resolve()}")
    return 0


def _demo_pipeline(say: Say, clip_path: str, out_dir: Path, tmp: str) -> None:
    say("\nVisionZip pipeline with a tiny random-weight LLaVA-1.5 (built here, saved and loaded like a real one;"
          " its answers are random words: the point is the mechanics)")
    t = time.perf_counter()
    vlm = load_vlm(build_tiny("llava", os.path.join(tmp, "tiny-llava"), image_size=112, patch=14), device="cpu")
    encoder = vlm.video_encoder()
    say(f"  model: {vlm.family.display}, vision tower {encoder.num_layers} layers, "
          f"select layer {encoder.layer_index}, "
          f"{encoder.tokens_per_image} tokens per frame uncompressed; loaded in {time.perf_counter() - t:.1f} s")
    for method, dominant, contextual in (("full", 1, 0), ("visionzip", 14, 3)):
        t = time.perf_counter()
        video = compress_video(vlm, clip_path, fps=1.0, dominant=dominant, contextual=contextual, method=method)
        seconds = time.perf_counter() - t
        first, second = _two_turns(vlm, video)
        say(f"  {method:<9} {video.num_frames} frames x {video.tokens_per_frame:>2} tokens = "
              f"{video.total_tokens:>4} visual "
              f"tokens (sample+encode+zip {seconds:.2f} s); answer prefilled {first.prefill_tokens} tokens "
              f"in {first.seconds['prefill'] * 1000:.0f} ms; follow-up prefilled {second.prefill_tokens} "
              f"(reused {second.cached_tokens} from the cache)")
        if method == "visionzip":
            say(f"  answer (random words): {first.answer!r}")
            picks = [0, len(video.indices) // 3, 2 * len(video.indices) // 3, len(video.indices) - 1]
            frames = sample_video(clip_path, frames=[video.indices[p] for p in picks]).frames
            views = encoder.view(frames)
            scores, assignment = video.maps()
            heat = attention_overlays(views, scores[picks], video.grid, cls_token=video.cls_token)
            kept = token_overlays(views, assignment[picks], video.grid, cls_token=video.cls_token,
                                  kept=kept_count(video))
            labels = [f"{t:.0f}s attention" for t in (video.timestamps[p] for p in picks)]
            labels += [f"{t:.0f}s kept/merged" for t in (video.timestamps[p] for p in picks)]
            sheet = contact_sheet(np.concatenate([heat, kept]), labels, columns=4, tile_width=160)
            target = save_png(sheet, out_dir / "visionzip_tokens.png")
            say(f"  attention heatmaps and kept/merged tokens -> {target}")


def _two_turns(vlm: VisionLanguageModel, video: CompressedVideo) -> list[Turn]:
    """The demo's question and a cached follow-up; returns both turns."""
    chat = Chat(vlm, video)
    config = GenerationConfig(max_new_tokens=12)
    chat.ask("What happens in this video ?", config)
    chat.ask("and then ?", config)
    return chat.turns


def _demo_qwen(say: Say, clip_path: str, tmp: str) -> None:
    """The same pipeline with tiny random Qwen2.5-VL / Qwen3-VL checkpoints (temporal patches, 3D positions)."""
    say("\nthe same with tiny random Qwen2.5-VL / Qwen3-VL checkpoints (two frames per temporal patch, each kept "
          "token at its own 3D position)")
    for family, name in (("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                         ("qwen3_vl", "Qwen3VLForConditionalGeneration")):
        if not hasattr(transformers, name):
            say(f"  {name}: not in this transformers ({transformers.__version__}); skipped")
            continue
        vlm = load_vlm(build_tiny(family, os.path.join(tmp, f"tiny-{family}")), device="cpu")
        video = compress_video(vlm, clip_path, fps=1.0, dominant=54, contextual=10)
        first, second = _two_turns(vlm, video)
        say(f"  {vlm.family.display:<10} {video.frames_text()} x {video.tokens_per_frame} tokens "
              f"= {video.total_tokens} visual tokens; answer prefilled {first.prefill_tokens} "
              f"tokens; follow-up prefilled {second.prefill_tokens} (reused {second.cached_tokens} from the cache)")


def generated_fallback(out_dir: Path) -> str:
    path = out_dir / "generated_clip.mkv"
    if not path.exists():
        make_clip(path, frames=120, fps=30, size=(320, 180))
    return str(path)


def _demo_real_attention(say: Say, clip_path: str, out_dir: Path) -> None:
    """Attention and kept tokens of a REAL pretrained encoder when its weights are fetched (else says how)."""
    folder = find_real_tower()
    if folder is None:
        say("\nreal pretrained weights: not fetched, so every picture above shows random weights "
              "(python -m comfy_visionzip fetch-weights gets a DINOv2-S/14, then the demo shows its real attention)")
        return
    encoder = load_tower(folder, device="cpu", dtype="fp32")
    frames = sample_video(clip_path, num_frames=4).frames
    video = compress_encoded(encoder, encoder.encode(frames), dominant=22, contextual=4)  # ~10% of 256 patches
    views = torch.from_numpy(enlarge(encoder.view(frames), 224))
    scores, assignment = video.maps()
    heat = with_legend(attention_overlays(views, scores, video.grid, cls_token=True), "attention")
    kept = with_legend(token_overlays(views, assignment, video.grid, cls_token=True, kept=kept_count(video)), "tokens")
    share = scores / scores.sum(1, keepdim=True)
    top = float(share.sort(1, descending=True).values[:, :13].sum(1).mean())
    height = max(heat.shape[1], kept.shape[1])  # the two legends wrap to different heights
    heat, kept = (np.pad(x, ((0, 0), (0, height - x.shape[1]), (0, 0), (0, 0)), constant_values=24)
                  for x in (heat, kept))
    target = save_png(contact_sheet(np.concatenate([heat, kept]), None, columns=4, tile_width=224),
                      out_dir / "real_attention.png")
    say(f"\nreal pretrained DINOv2-S/14 ({folder}): on {Path(clip_path).name} the top 5% of patches "
          f"hold {top:.2f} of "
          f"the select layer's CLS attention (summed over heads); VisionZip keeps 22 + 4 of 257 tokens -> {target}")


PROBE_QUESTIONS = (("What color is the triangle?", "red"), ("What shape is the blue object?", "circle"),
                   ("How many objects are there?", "2"), ("Is the red object left of the blue object?", "yes"),
                   ("Is there a yellow square?", "no"))


def _demo_probe(say: Say, clip_path: str, out_dir: Path) -> None:
    """The probe model (a small LLaVA trained here on the real DINOv2) answering about a frame of the clip with a
    red triangle and a blue circle pasted on it, with full tokens and with VisionZip's 64, beside a random model."""
    folder = find_probe()
    if folder is None:
        say("\nprobe model: not built, so every answer above comes from random weights "
            "(python -m comfy_visionzip train-probe trains a small LLaVA on the real DINOv2 that answers questions "
            "about shapes, in about 25 minutes on 2 CPU cores; then the demo asks it)")
        return
    base = square(sample_video(clip_path, num_frames=1).frames[0].numpy())
    things = [Thing("red", "triangle", "large", 44, 40, 90), Thing("blue", "circle", "medium", 34, 150, 60)]
    picture = np.clip(draw(base, things, np.random.default_rng(0)) + 0.5, 0, 255).astype(np.uint8)
    path = save_png(picture, out_dir / "probe_question.png")
    vlm = load_vlm(folder, device="cpu", dtype="fp32")
    say(f"\nthe probe model ({Path(folder).name}: LLaVA-1.5 on the real DINOv2-S/14, trained by train-probe) about a "
        f"frame of {Path(clip_path).name} with a red triangle and a blue circle pasted on it -> {path}")
    with tempfile.TemporaryDirectory() as tmp:
        random_vlm = load_vlm(build_tiny("llava", os.path.join(tmp, "tiny-llava"), image_size=112, patch=14),
                              device="cpu")
        random_video = compress_video(random_vlm, str(path), num_frames=1, dominant=14, contextual=3)
        nonsense = Chat(random_vlm, random_video).ask(PROBE_QUESTIONS[0][0], GenerationConfig(max_new_tokens=4))
    videos = {name: compress_video(vlm, str(path), num_frames=1, method=m)
              for name, m in (("full (256)", "full"), ("visionzip (54+10)", "visionzip"))}
    for question, truth in PROBE_QUESTIONS:
        said = {name: Chat(vlm, v).ask(question, GenerationConfig(max_new_tokens=3)).strip()
                for name, v in videos.items()}
        say(f"  {question:<44} " + ", ".join(f"{name}: {a!r}" for name, a in said.items()) + f"  (true: {truth})")
    say(f"  the random tiny LLaVA of the pipeline above, asked {PROBE_QUESTIONS[0][0]!r}: {nonsense.strip()!r}")
