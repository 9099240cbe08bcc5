"""The Qwen vision side: our encoder (scores, keys, merged tokens, the VisionZip selection) against the
model's own vision forward on the same frames (run by hand; not a test).

    python bench/bench_qwen_vision.py                 # CPU, fp32, about 6 minutes on 2 cores
    python bench/bench_qwen_vision.py --device cuda --dtype bf16 --frames 32 --size 448

Towers at the released sizes with random weights (no checkpoint can be downloaded here; the cost of a
forward does not depend on the weights): Qwen2.5-VL-3B's vision tower (32 blocks of width 1280, window
attention, full attention in blocks 7/15/23/31, 2x2 merger into 2048) and Qwen3-VL-2B's (24 blocks of
1024, DeepStack after blocks 5/11/17, merger into 2048). Frames of the real clip (../shared/media), or a
generated one, resized as the processor does.

Timed, best of --repeats (the three run in turn, so drift hits them alike), on the same pixel rows:
  own      the tower's forward, as the model runs it for ``pixel_values_videos`` (merged tokens out)
  ours     our encoder's forward: the same forward with two hooks on the last block, then the attention
           each patch receives (in query chunks), head-averaged keys, both averaged per 2x2 group and
           put back in raster order
  +zip     ours + VisionZip's selection and merge to --tokens per temporal patch (54+10 by default)
Writes bench/results/qwen_vision_<device>_<dtype>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CLIP = HERE.parent.parent / "shared" / "media" / "flipping_a_pancake.mkv"

TOWERS = {
    "Qwen2.5-VL-3B vision": ("qwen2_5_vl", dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                                window_size=112, out_hidden_size=2048,
                                                fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)),
    "Qwen3-VL-2B vision": ("qwen3_vl", dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                            patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                            out_hidden_size=2048, num_position_embeddings=2304,
                                            deepstack_visual_indexes=[5, 11, 17])),
}


def tower(kind: str, config: dict, dtype, device):
    import transformers as tf

    if kind == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as cls

        cfg = tf.Qwen2_5_VLVisionConfig(**config)
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as cls

        cfg = tf.Qwen3VLVisionConfig(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).to(device=device, dtype=dtype).eval()


def frames(count: int, size: int) -> torch.Tensor:
    import tempfile

    from comfy_visionzip import sample_video
    from comfy_visionzip.testing.synthetic import make_clip

    source = (str(CLIP) if CLIP.exists()
              else make_clip(Path(tempfile.mkdtemp()) / "clip.mp4", frames=120, size=(640, 360)))
    clip = sample_video(source, num_frames=count)
    return clip.frames, source


def best(fns: dict, repeats: int, device) -> dict:
    """Best time of each function, run in turn (own, ours, ours+zip, own, ...) so that drift hits them alike."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up (allocator, kernels), not timed
        for _ in range(repeats):
            for name, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    return {name: min(values) for name, values in times.items()}


def measure(name, kind, config, video, dominant, contextual, args, dtype, device) -> dict:
    from comfy_visionzip.models.qwen_vision import QwenEncoder
    from comfy_visionzip.preprocess import Preprocess

    visual = tower(kind, config, dtype, device)
    factor = config["patch_size"] * 2
    pixels = args.size * args.size
    spec = Preprocess(pixels=(factor, pixels, pixels, config["patch_size"], 2))
    encoder = QwenEncoder(visual, spec, window=kind == "qwen2_5_vl")
    rows, grid = encoder.preprocess(video)
    rows, grid = rows.to(device), grid.to(device)
    timed = best({"own": lambda: visual(rows, grid_thw=grid), "ours": lambda: encoder.encode_pixels(rows, grid),
                  "zip": lambda: encoder.zip(encoder.encode_pixels(rows, grid), dominant, contextual)},
                 args.repeats, device)
    own, ours, zipped = timed["own"], timed["ours"], timed["zip"]
    encoded = encoder.encode_pixels(rows, grid)
    row = {"tower": name, "temporal_patches": int(grid.shape[0]), "grid": [int(grid[0, 1]), int(grid[0, 2])],
           "merged_tokens_per_patch": int(encoded.hidden.shape[1]), "kept_per_patch": dominant + contextual,
           "own_s": round(own, 3), "ours_s": round(ours, 3), "ours_zip_s": round(zipped, 3),
           "ours_over_own": round(ours / own, 3), "zip_over_own": round(zipped / own, 3)}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--frames", type=int, default=4, help="sampled frames (two per temporal patch)")
    parser.add_argument("--size", type=int, default=336, help="frames are resized to about size x size pixels")
    parser.add_argument("--tokens", type=int, default=64, help="tokens kept per temporal patch (54+10 for 64)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from comfy_visionzip.zip import split_tokens

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(torch.get_num_threads())
    video, source = frames(args.frames, args.size)
    dominant, contextual = split_tokens(args.tokens)
    rows_out = [measure(name, kind, config, video, dominant, contextual, args, dtype, device)
                for name, (kind, config) in TOWERS.items()]
    results = {"device": str(device), "dtype": args.dtype, "frames": args.frames, "size": args.size, "source": source,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "repeats": args.repeats, "rows": rows_out}
    out = HERE / "results" / f"qwen_vision_{device.type}_{args.dtype}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = [f"# Qwen vision side: ours vs the model's own forward ({device}, {args.dtype})", "",
             f"{args.frames} frames of {Path(source).name} at about {args.size}x{args.size} px, "
             f"best of {args.repeats} (run in turn), "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Random weights at the released sizes.",
             "",
             "| tower | temporal patches | merged tokens / patch | own forward s | ours s | ours / own "
             "| ours + zip s | (+zip) / own |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['tower']} | {r['temporal_patches']} | "
                     f"{r['merged_tokens_per_patch']} -> {r['kept_per_patch']} | "
                     f"{r['own_s']} | {r['ours_s']} | {r['ours_over_own']} | {r['ours_zip_s']} | {r['zip_over_own']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
