"""Long-video benchmark, end to end from the file (run by hand; not a test).

    python bench/bench_long_video.py                                 # CPU, fp32 (about 20 minutes on 2 cores)
    python bench/bench_long_video.py --device cuda --dtype bf16      # where a GPU exists
    python bench/bench_long_video.py --parts memory --minutes 1,10   # one part, shorter

A LLaVA-1.5-shaped model with random weights, saved and loaded like a real checkpoint: a CLIP
ViT-L/14-336 tower (24 layers, width 1024, 577 tokens per frame) and a scaled Llama language model
(8 layers, hidden 2048, FFN 5504, 8192 positions). Three parts:

  memory   1, 10 and 60 minutes of generated video (640x360, 5 fps source), sampled at 1 fps, file ->
           compressed tokens (54 + 10 per frame), each length in a fresh process: peak RSS during the
           run (sampled every 20 ms) beside the compressed tokens' own bytes, and frames per second.
           Flat means the 60-minute peak is within 64 MiB of the 1-minute peak plus the extra tokens.
           On a CPU the ViT-L tower would take hours for 3600 frames, so ``--memory-tower reduced``
           (the default without CUDA) keeps its input, width and token count but runs 2 layers with a
           small MLP: memory is about what is held, not how deep the tower is.
  tenx     10x frames at equal tokens, from a 2-minute 1280x720 clip: (i) 8 frames x 576 uncompressed,
           (ii) 80 frames with VisionZip at the same prompt length (the planner picks the tokens per
           frame that make 80 frames' prompt, timestamps included, no longer than (i)'s), (iii) 8 frames
           with VisionZip 54 + 10. Wall time per stage: decode, encode (tower to the select layer),
           zip, prefill, first token; and the ratios.
  overlap  decode + encode together (a background decode thread, the default) against decode alone
           plus encode alone, and against the same two in one thread.
  resolution  8 frames of the same content at 3840x2160, 1920x1080 and 854x480, file -> tokens, each in
           a fresh process: peak RSS growth during the run, with frames scaled at decode time (the
           default) and without (the frames decoded at full size, as before).

Writes bench/results/long_video_<device>_<dtype>.json / .md and a .png plot (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LM_LAYERS, LM_HIDDEN, LM_FFN, LM_HEADS = 8, 2048, 5504, 16
PARTS = ("memory", "resolution", "overlap", "tenx")
QUESTION = "What happens in this video ?"


def build(folder: str, *, tower: str) -> str:
    """Save a LLaVA-1.5-shaped random checkpoint (``tower``: "full" ViT-L/14-336 or "reduced" 2 layers)."""
    import torch
    import transformers as tf

    from comfy_visionzip.testing.tiny import _clip_processor, make_tokenizer, save_checkpoint

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(0)
    tok = make_tokenizer(32000)
    reduced = tower == "reduced"
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=256 if reduced else LM_HIDDEN,
                          intermediate_size=512 if reduced else LM_FFN, num_hidden_layers=2 if reduced else LM_LAYERS,
                          num_attention_heads=LM_HEADS, num_key_value_heads=LM_HEADS, max_position_embeddings=8192,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=64 if reduced else 4096,
                                 num_hidden_layers=2 if reduced else 24, num_attention_heads=16, image_size=336,
                                 patch_size=14, projection_dim=768)
    config = tf.LlavaConfig(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    return save_checkpoint(folder, tf.LlavaForConditionalGeneration(config), tok, _clip_processor(336))


def make_video(folder: str, minutes: float, *, size=(640, 360), fps: int = 5) -> str:
    from comfy_visionzip.testing.synthetic import make_clip

    path = os.path.join(folder, f"generated_{minutes:g}min_{size[1]}p.mkv")
    if not os.path.isfile(path):
        make_clip(path, frames=int(minutes * 60 * fps), fps=fps, size=size,
                  options={"preset": "ultrafast", "g": str(fps * 10)})
    return path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident set size seen while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return False


def child_memory(args) -> int:
    """One length, in this fresh process: file -> compressed tokens at 1 fps; prints one JSON line."""
    import torch

    from comfy_visionzip.pipeline import compress_video
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    compress_video(vlm, args.clip, num_frames=2)  # warm-up: allocator, kernels, the index cache of another clip
    with PeakRSS() as rss:
        t = time.perf_counter()
        video = compress_video(vlm, args.clip, fps=1.0, dominant=54, contextual=10)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    token_bytes = video.tokens.numel() * video.tokens.element_size()
    map_bytes = sum(t.numel() * t.element_size() for t in (video.scores, video.assignment) if t is not None)
    print(json.dumps({"frames": video.num_frames, "seconds": seconds, "fps": video.num_frames / seconds,
                      "rss_before": rss.start, "rss_peak": rss.peak, "token_bytes": token_bytes, "map_bytes": map_bytes,
                      "gpu_peak": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0}))
    return 0


def child_resolution(args) -> int:
    from comfy_visionzip.pipeline import compress_video
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    scale = args.scale == "on"
    compress_video(vlm, args.clip, num_frames=2, scale_at_decode=scale, batch_size=8)  # warm-up at this size
    with PeakRSS() as rss:
        video = compress_video(vlm, args.clip, num_frames=8, scale_at_decode=scale, batch_size=8)
    print(json.dumps({"frames": video.num_frames, "rss_before": rss.start, "rss_peak": rss.peak,
                      "frame_size": list(video.meta["frame_size"])}))
    return 0


def part_resolution(args, tmp: str, model: str) -> dict:
    from comfy_visionzip.testing.synthetic import make_clip

    rows = []
    for width, height in ((3840, 2160), (1920, 1080), (854, 480)):
        clip = os.path.join(tmp, f"res_{height}p.mkv")
        if not os.path.isfile(clip):
            make_clip(clip, frames=24, fps=24, size=(width, height), options={"preset": "ultrafast", "g": "6"})
        for scale in ("on", "off"):
            result = subprocess.run([sys.executable, __file__, "--child", "resolution", "--clip", clip,
                                     "--model", model, "--device", args.device, "--dtype", args.dtype,
                                     "--scale", scale],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"resolution run {height}p failed:\n{result.stderr[-2000:]}")
            row = {"source": f"{width}x{height}", "scale_at_decode": scale == "on",
                   **json.loads(result.stdout.strip().splitlines()[-1])}
            row["growth"] = row["rss_peak"] - row["rss_before"]
            rows.append(row)
            print(f"resolution: {width}x{height}, scale at decode {scale:>3}: decoded {row['frame_size']}, "
                  f"RSS growth {row['growth'] / 2**20:.1f} MiB", flush=True)
    scaled = [r["growth"] for r in rows if r["scale_at_decode"]]
    return {"rows": rows, "spread": max(scaled) / max(min(scaled), 1) - 1}


def part_memory(args, tmp: str, model: str) -> dict:
    rows = []
    for minutes in args.minutes:
        clip = make_video(tmp, minutes)
        result = subprocess.run([sys.executable, __file__, "--child", "memory", "--clip", clip, "--model", model,
                                 "--device", args.device, "--dtype", args.dtype], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"memory run of {minutes} min failed:\n{result.stderr[-2000:]}")
        row = {"minutes": minutes, **json.loads(result.stdout.strip().splitlines()[-1])}
        row["growth"] = row["rss_peak"] - row["rss_before"]
        rows.append(row)
        print(f"memory: {minutes:>4g} min, {row['frames']:>5} frames at 1 fps: "
              f"peak RSS {row['rss_peak'] / 2**20:8.1f} MiB "
              f"(+{row['growth'] / 2**20:7.1f} during the run), tokens {row['token_bytes'] / 2**20:7.1f} MiB, "
              f"{row['fps']:.1f} frames/s", flush=True)
    first, last = rows[0], rows[-1]
    extra_tokens = (last["token_bytes"] + last["map_bytes"]) - (first["token_bytes"] + first["map_bytes"])
    excess = last["rss_peak"] - first["rss_peak"] - extra_tokens
    return {"rows": rows, "excess_over_tokens": excess, "flat": excess <= 64 * 2**20}


def _stages(vlm, clip: str, *, num_frames: int, method: str, dominant: int, contextual: int, sync) -> dict:
    """Wall time of each stage for one plan, stage by stage (decode, encode, zip, prefill, first token)."""
    import torch

    from comfy_visionzip.answer import Chat
    from comfy_visionzip.pipeline import compress_encoded, label_tokens, video_source
    from comfy_visionzip.tokens import CompressedVideo

    encoder = vlm.video_encoder()
    handle = video_source(vlm, clip, num_frames=num_frames)
    t = time.perf_counter()
    chunks = list(handle.iter(chunk_size=8))
    decode = time.perf_counter() - t
    encode = zip_ = 0.0
    parts = []
    for chunk in chunks:
        sync()
        t = time.perf_counter()
        encoded = encoder.encode(chunk.frames, batch_size=8)
        sync()
        encode += time.perf_counter() - t
        encoded.timestamps, encoded.indices = chunk.timestamps, chunk.indices
        t = time.perf_counter()
        parts.append(compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual, method=method,
                                      keep_maps=False))
        sync()
        zip_ += time.perf_counter() - t
    video = CompressedVideo(tokens=torch.cat([p.tokens for p in parts]),
                            timestamps=sum((p.timestamps for p in parts), []),
                            indices=sum((p.indices for p in parts), []), method=method, dominant=dominant,
                            contextual=contextual, meta=dict(parts[0].meta))
    label_tokens(vlm, video)
    video.meta["duration"] = handle.duration()
    chat = Chat(vlm, video)
    t = time.perf_counter()
    ids = chat._ids([{"role": "user", "text": QUESTION}])
    sync()
    t_prefill = time.perf_counter()
    logits, _, _ = chat.prefill(ids)
    sync()
    prefill = time.perf_counter() - t_prefill
    int(logits.argmax())  # the first token
    first_token = time.perf_counter() - t
    del chat
    return {"frames": video.num_frames, "tokens_per_frame": video.tokens_per_frame, "visual_tokens": video.total_tokens,
            "prompt_tokens": len(ids), "decode": decode, "encode": encode, "zip": zip_, "prefill": prefill,
            "first_token": first_token}


def part_tenx(args, tmp: str, model: str, sync) -> dict:
    from comfy_visionzip.budget import plan_budget
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(model, device=args.device, dtype=args.dtype)
    clip = make_video(tmp, 2, size=(1280, 720), fps=30)
    _stages(vlm, clip, num_frames=2, method="visionzip", dominant=54, contextual=10, sync=sync)  # warm-up
    rows = {}
    rows["i"] = {"label": "(i) 8 frames x 576 uncompressed",
                 **_stages(vlm, clip, num_frames=8, method="full", dominant=1, contextual=0, sync=sync)}
    print(f"tenx (i): {rows['i']}", flush=True)
    # (ii): 80 frames, as many tokens per frame as keep the whole prompt within (i)'s (the planner counts it)
    budget = rows["i"]["prompt_tokens"] + 1
    for per in range(64, 1, -1):
        try:
            plan = plan_budget(vlm, clip, QUESTION, budget=budget, policy="strict", tokens_per_frame=per,
                               max_new_tokens=1, num_frames=80)
            break
        except ValueError:
            continue
    rows["ii"] = {"label": f"(ii) 80 frames x {plan.per_frame} VisionZip ({plan.dominant}+{plan.contextual})",
                  "planned_prompt_tokens": plan.prompt_tokens,
                  **_stages(vlm, clip, num_frames=80, method="visionzip", dominant=plan.dominant,
                            contextual=plan.contextual, sync=sync)}
    print(f"tenx (ii): {rows['ii']}", flush=True)
    rows["iii"] = {"label": "(iii) 8 frames x 64 VisionZip (54+10)",
                   **_stages(vlm, clip, num_frames=8, method="visionzip", dominant=54, contextual=10, sync=sync)}
    print(f"tenx (iii): {rows['iii']}", flush=True)
    ratios = {"prefill_ii_over_i": rows["ii"]["prefill"] / rows["i"]["prefill"],
              "prefill_iii_over_i": rows["iii"]["prefill"] / rows["i"]["prefill"],
              "frames_ii_over_i": rows["ii"]["frames"] / rows["i"]["frames"],
              "prompt_ii_over_i": rows["ii"]["prompt_tokens"] / rows["i"]["prompt_tokens"]}
    return {"clip": "2 min, 1280x720, 30 fps (generated)", "rows": rows, "ratios": ratios}


def part_overlap(args, tmp: str, model: str, sync) -> dict:
    from comfy_visionzip.pipeline import compress_frames, video_source
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(model, device=args.device, dtype=args.dtype)
    encoder = vlm.video_encoder()
    clip = make_video(tmp, 2, size=(1280, 720), fps=30)
    handle = video_source(vlm, clip, fps=1.0)
    total = len(handle.plan()[0])
    # warm-up
    compress_frames(encoder, handle.pick(handle.plan()[0][:8]).iter(chunk_size=8), dominant=54, contextual=10)

    def best(run) -> float:  # best of args.repeats: the machine's other load only ever adds time
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    chunks = list(handle.iter(chunk_size=8))
    decode = best(lambda: list(handle.iter(chunk_size=8)))
    encode = best(lambda: compress_frames(encoder, chunks, dominant=54, contextual=10, batch_size=8, prefetch_depth=0,
                                          total=total))
    chunks.clear()  # free the decoded frames before the streaming runs
    timings = {name: best(lambda depth=depth: compress_frames(encoder, handle.iter(chunk_size=8), dominant=54,
                                                              contextual=10, batch_size=8, prefetch_depth=depth,
                                                              total=total))
               for name, depth in (("one thread", 0), ("background decode", 1))}
    row = {"frames": total, "decode_alone": decode, "encode_alone": encode, "sum": decode + encode,
           "serial": timings["one thread"], "overlapped": timings["background decode"]}
    print(f"overlap: {row}", flush=True)
    return row


def write(args, results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    tag = f"long_video_{args.device.split(':')[0]}_{args.dtype}"
    previous = out / f"{tag}.json"
    if previous.exists():  # a run of some parts updates those parts and keeps the others
        kept = json.loads(previous.read_text())
        older = kept.get("commands") or {k: kept.get("command", "python bench/bench_long_video.py")
                                         for k in kept if k in PARTS}
        commands = {**older, **{k: results["command"] for k in results if k in PARTS and "command" in results}}
        results = {**kept, **results, "commands": commands}
    else:
        results["commands"] = {k: results.get("command", "") for k in results if k in PARTS}
    (out / f"{tag}.json").write_text(json.dumps(results, indent=2))
    lines = ["# Long-video benchmark", "",
             "Commands: " + "; ".join(f"{part}: `{cmd}`" for part, cmd in results["commands"].items()),
             f"Machine: {results['machine']}. LLaVA-1.5-shaped random weights (CLIP ViT-L/14-336 tower; Llama LM "
             f"{LM_LAYERS} layers, hidden {LM_HIDDEN}).", ""]
    if "memory" in results:
        m = results["memory"]
        lines += [f"## Memory against length (file -> compressed tokens, 1 fps, 54+10 per frame; tower: {m['tower']})",
                  "",
                  "| video | frames | peak RSS MiB | RSS growth during the run MiB | tokens + maps MiB | frames/s |",
                  "|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['minutes']:g} min | {r['frames']} | {r['rss_peak'] / 2**20:.1f} | "
                         f"{r['growth'] / 2**20:.1f} | "
                         f"{(r['token_bytes'] + r['map_bytes']) / 2**20:.1f} | {r['fps']:.1f} |")
        lines += ["",
                  "Longest minus shortest peak, less the extra tokens' own bytes: "
                  f"{m['excess_over_tokens'] / 2**20:.1f} MiB "
                  f"({'flat: within 64 MiB' if m['flat'] else 'NOT flat: over 64 MiB'}).",
                  ""]
    if "tenx" in results:
        x = results["tenx"]
        lines += [f"## 10x frames at equal tokens ({x['clip']})", "",
                  "| plan | visual tokens | prompt tokens | decode s | encode s | zip s | prefill s | first token s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in x["rows"].values():
            lines.append(f"| {r['label']} | {r['visual_tokens']} | {r['prompt_tokens']} | {r['decode']:.2f} | "
                         f"{r['encode']:.2f} | {r['zip']:.3f} | {r['prefill']:.2f} | {r['first_token']:.2f} |")
        ratio = x["ratios"]
        lines += ["",
                  f"Prefill (ii)/(i) = {ratio['prefill_ii_over_i']:.3f} "
                  f"with {ratio['frames_ii_over_i']:.0f}x the frames "
                  f"(prompt {ratio['prompt_ii_over_i']:.3f}x); (iii)/(i) = {ratio['prefill_iii_over_i']:.3f}.",
                  ""]
    if "resolution" in results:
        r = results["resolution"]
        lines += [f"## Memory per batch against source resolution (8 frames, batch 8, tower: {r['tower']})", "",
                  "| source | scaled at decode | decoded frame (H, W) | RSS growth during the run MiB |",
                  "|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['source']} | {'yes' if row['scale_at_decode'] else 'no (full size)'} | "
                         f"{tuple(row['frame_size'])} | {row['growth'] / 2**20:.1f} |")
        lines += ["", f"Scaled at decode, the largest growth is {r['spread'] * 100:.1f}% above the smallest.", ""]
    if "overlap" in results:
        o = results["overlap"]
        lines += [f"## Decode overlapped with encode ({o['frames']} frames of a 1280x720 clip, "
                  f"1 fps, tower: {o['tower']})",
                  "",
                  "| decode alone s | encode alone s | sum s | one thread s | background decode s |",
                  "|---|---|---|---|---|",
                  f"| {o['decode_alone']:.2f} | {o['encode_alone']:.2f} | {o['sum']:.2f} | {o['serial']:.2f} | "
                  f"{o['overlapped']:.2f} |",
                  ""]
    (out / f"{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(results, out / f"{tag}.png")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # this process only (a benchmark script, never imported by the pack)
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return
    panels = [k for k in ("memory", "tenx") if k in results]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, key in zip(axes, panels):
        if key == "memory":
            rows = results["memory"]["rows"]
            minutes = [r["minutes"] for r in rows]
            ax.plot(minutes, [r["rss_peak"] / 2**20 for r in rows], "o-", label="peak RSS")
            base = rows[0]["rss_peak"] - rows[0]["token_bytes"] - rows[0]["map_bytes"]
            ax.plot(minutes, [(base + r["token_bytes"] + r["map_bytes"]) / 2**20 for r in rows], "s--",
                    label="1-min peak - its tokens + each run's tokens")
            ax.plot(minutes, [(r["rss_peak"] - r["token_bytes"] - r["map_bytes"]) / 2**20 for r in rows], "^-",
                    label="peak RSS - the tokens' own bytes (flat = bounded)")
            ax.set_ylim(bottom=0)
            ax.set_xlabel("video length (minutes, sampled at 1 fps)")
            ax.set_ylabel("MiB")
            ax.set_title("Memory: file -> compressed tokens")
            ax.legend(fontsize=8)
        else:
            rows = list(results["tenx"]["rows"].values())
            stages = ["decode", "encode", "zip", "prefill"]
            bottom = [0.0] * len(rows)
            for stage in stages:
                values = [r[stage] for r in rows]
                ax.bar(range(len(rows)), values, bottom=bottom, label=stage)
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.set_xticks(range(len(rows)), [r["label"].split(" ", 1)[1] for r in rows], fontsize=7)
            ax.set_ylabel("seconds")
            ax.set_title("10x frames at equal tokens: time per stage")
            ax.legend(fontsize=8)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--parts", default="memory,resolution,overlap,tenx")
    parser.add_argument("--minutes", default="1,10,60", help="video lengths for the memory part")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each overlap measurement (the best is kept)")
    parser.add_argument("--memory-tower", choices=["full", "reduced"], default=None,
                        help="tower for the memory and overlap parts (default: full on CUDA, reduced elsewhere)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "visionzip-bench"),
                        help="where the generated clips and checkpoints are kept between runs")
    parser.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the saved .json only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--scale", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "memory":
        return child_memory(args)
    if args.child == "resolution":
        return child_resolution(args)
    if args.replot:
        saved = HERE / "results" / f"long_video_{args.device.split(':')[0]}_{args.dtype}.json"
        write(args, {k: v for k, v in json.loads(saved.read_text()).items() if k in ("machine", "commands")})
        return 0
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    args.minutes = [float(m) for m in args.minutes.split(",")]
    tower = args.memory_tower or ("full" if args.device.startswith("cuda") else "reduced")
    os.makedirs(args.cache, exist_ok=True)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else ""
    results = {"command": "python bench/bench_long_video.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores{', ' + gpu if gpu else ''}; "
                          f"{args.device}, {args.dtype}; "
                          f"torch {torch.__version__}, transformers {transformers.__version__}"}
    parts = args.parts.split(",")
    small = build(os.path.join(args.cache, f"llava-1.5-shaped-{tower}"), tower=tower)
    if "memory" in parts:
        results["memory"] = {"tower": tower, **part_memory(args, args.cache, small)}
    if "resolution" in parts:
        results["resolution"] = {"tower": tower, **part_resolution(args, args.cache, small)}
    if "overlap" in parts:
        results["overlap"] = {"tower": tower, **part_overlap(args, args.cache, small, sync)}
    if "tenx" in parts:
        full = build(os.path.join(args.cache, "llava-1.5-shaped-full"), tower="full")
        results["tenx"] = part_tenx(args, args.cache, full, sync)
    write(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
