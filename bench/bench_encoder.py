"""Encoder benchmark (run by hand; not a test).

    python bench/bench_encoder.py                    # CPU, fp32
    python bench/bench_encoder.py --device cuda --dtype bf16

A CLIP ViT-L/14-336-shaped tower (24 layers, hidden 1024, 16 heads, 577 tokens; random weights: the
timings are about compute) at batch 1 and 8, three ways of getting LLaVA's features:
  (a) stock: SDPA, output_hidden_states, take hidden_states[-2] (what LLaVA does; no scores);
  (b) reference-style: eager attention with output_attentions for every layer (how the reference
      VisionZip gets its CLS scores), then VisionZip;
  (c) ours: SDPA to the select layer only, CLS row + keys from hooks, then VisionZip (54 + 10).
Each variant runs in a fresh process; peak extra memory is the growth of peak RSS (CPU) or of
torch.cuda.max_memory_allocated (GPU) over the model's own footprint. Writes
bench/results/encoder.md and .json.
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

VARIANTS = {
    "a": "stock SDPA, hidden_states[-2]",
    "b": "eager, attentions of every layer + zip",
    "c": "ours: hooks, stop at layer -2 + zip",
}


def child(variant: str, batch: int, device: str, dtype_name: str, repeats: int) -> dict:
    import resource

    import torch
    import transformers

    from comfy_visionzip.encoder import VisionEncoder
    from comfy_visionzip.preprocess import Preprocess
    from comfy_visionzip.zip import visionzip

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14)
    attn = "eager" if variant == "b" else "sdpa"
    tower = transformers.CLIPVisionModel._from_config(config, attn_implementation=attn).to(device, dtype).eval()
    pixels = torch.randn(batch, 3, 336, 336, device=device, dtype=dtype)
    encoder = VisionEncoder(tower, Preprocess(shortest_edge=336, crop_hw=(336, 336)), vision_feature_layer=-2)
    layer = encoder.layer_index

    def run():
        with torch.inference_mode():
            if variant == "a":
                return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            if variant == "b":
                out = tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
                hidden = out.hidden_states[-2]
                scores = out.attentions[layer][:, :, 0, 1:].sum(1)
                # the reference reads keys inside a patched attention forward: the select layer's k_proj of
                # its layer-normed input, averaged over heads; computed the same way here
                block = (tower.vision_model.encoder.layers[layer] if hasattr(tower, "vision_model")
                         else tower.encoder.layers[layer])
                k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))
                keys = k.view(batch, k.shape[1], 16, -1).mean(2)
                return visionzip(hidden, scores.float(), keys.float(), 54, 10).tokens
            encoded = encoder.encode_pixels(pixels)
            return visionzip(encoded.hidden, encoded.scores, encoded.keys, 54, 10).tokens

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()
    sync()
    if device.startswith("cuda"):
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"variant": variant, "batch": batch, "seconds": best, "per_frame_ms": best / batch * 1000,
            "peak_extra_mib": extra / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, args.dtype, args.repeats)))
        return 0

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, str(batch), "--device", args.device,
                   "--dtype", args.dtype, "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"batch {batch} ({variant}) {VARIANTS[variant]:<40} {row['per_frame_ms']:8.1f} ms/frame  "
                  f"peak extra {row['peak_extra_mib']:7.1f} MiB", flush=True)

    lines = ["# Encoder benchmark", "",
             f"Command: `python bench/bench_encoder.py --device {args.device} --dtype {args.dtype}`; "
             f"{platform.machine()}, {os.cpu_count()} cores, torch on {args.device}, {args.dtype}. "
             "CLIP ViT-L/14-336 shape (24 layers, 577 tokens), random weights; best of "
             f"{args.repeats} runs after a warm-up.", "",
             "| batch | variant | ms / frame | peak extra MiB | time vs (a) | time vs (b) |",
             "|---|---|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["batch"] == batch}
        for v in VARIANTS:
            r = by[v]
            lines.append(f"| {batch} | ({v}) {VARIANTS[v]} | {r['per_frame_ms']:.1f} | {r['peak_extra_mib']:.1f} | "
                         f"{r['seconds'] / by['a']['seconds']:.2f} | {r['seconds'] / by['b']['seconds']:.2f} |")
        print(f"batch {batch}: ours/stock time {by['c']['seconds'] / by['a']['seconds']:.2f}, ours/eager "
              f"{by['c']['seconds'] / by['b']['seconds']:.2f}; peak extra ours {by['c']['peak_extra_mib']:.0f} MiB vs "
              f"stock {by['a']['peak_extra_mib']:.0f} MiB vs eager {by['b']['peak_extra_mib']:.0f} MiB")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    tag = f"encoder_{args.device.split(':')[0]}_{args.dtype}"
    (out_dir / f"{tag}.json").write_text(json.dumps(rows, indent=2))
    (out_dir / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / (tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
