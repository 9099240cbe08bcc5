"""Prefill benchmark (run by hand; not a test).

    python bench/bench_prefill.py                      # CPU, fp32
    python bench/bench_prefill.py --device cuda --dtype bf16

A LLaVA-shaped model scaled down (Llama language model: 8 layers, hidden 2048, FFN 5504; random
weights: timings are about compute) answers from 2880, 1440, 640, 320 and 160 visual tokens (e.g. 5
frames x 576, and VisionZip's 288 / 128 / 64 / 32 per frame). Prints the prefill time of each with its
ratio to 2880 beside the paper's FLOPs ratio, T * (4 n d^2 + 2 n^2 d + 2 n d m) (n tokens, d hidden,
m FFN width, T layers), and the time to answer a follow-up with the kept KV cache against
re-running the whole conversation. Writes bench/results/prefill_<device>_<dtype>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LAYERS, HIDDEN, FFN, HEADS = 8, 2048, 5504, 16


def build(folder: str):
    import torch
    import transformers as tf

    from comfy_visionzip.testing.tiny import _clip_processor, make_tokenizer, save_checkpoint

    torch.manual_seed(0)
    tok = make_tokenizer(32000)
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=8192,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16,
                                 image_size=336, patch_size=14)
    config = tf.LlavaConfig(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    save_checkpoint(folder, tf.LlavaForConditionalGeneration(config), tok, _clip_processor(336))


def flops(n: int) -> float:
    return LAYERS * (4 * n * HIDDEN**2 + 2 * n * n * HIDDEN + 2 * n * HIDDEN * FFN)


def main() -> int:
    import torch

    from comfy_visionzip.answer import Chat, GenerationConfig
    from comfy_visionzip.pipeline import label_tokens
    from comfy_visionzip.tokens import CompressedVideo
    from comfy_visionzip.vlm import load_vlm

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        vlm = load_vlm(tmp, device=args.device, dtype=args.dtype)
    one = GenerationConfig(max_new_tokens=1)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for frames, per_frame in ((5, 576), (5, 288), (5, 128), (5, 64), (5, 32)):
        video = CompressedVideo(tokens=torch.randn(frames, per_frame, 1024) * 0.1,
                                timestamps=[float(i) for i in range(frames)],
                                indices=list(range(frames)), method="visionzip", dominant=per_frame, contextual=0)
        label_tokens(vlm, video)
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first run warms up
            chat = Chat(vlm, video, timestamps=False)
            ids = chat._ids([{"role": "user", "text": "What happens in this video ?"}])
            sync()
            t = time.perf_counter()
            chat.prefill(ids)
            sync()
            best = min(best, time.perf_counter() - t)
        rows.append({"visual_tokens": frames * per_frame, "prompt_tokens": len(ids), "seconds": best})
        print(f"{frames * per_frame:>5} visual tokens ({len(ids)} in the prompt): prefill {best * 1000:8.1f} ms",
              flush=True)

    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["flops_ratio"] = flops(r["prompt_tokens"]) / flops(base["prompt_tokens"])

    # follow-up: kept cache vs the whole conversation again (VisionZip's 64 per frame x 5 frames)
    video = CompressedVideo(tokens=torch.randn(5, 64, 1024) * 0.1, timestamps=[0.0, 1, 2, 3, 4], indices=list(range(5)),
                            method="visionzip", dominant=54, contextual=10)
    label_tokens(vlm, video)
    follow = {}
    for visual, tensor in (("2880", torch.randn(5, 576, 1024) * 0.1), ("320", video.tokens)):
        video.tokens = tensor
        chat = Chat(vlm, video, timestamps=False)
        chat.ask("What happens in this video ?", GenerationConfig(max_new_tokens=8))
        sync()
        t = time.perf_counter()
        chat.ask("Who is in the kitchen ?", one)
        sync()
        cached = time.perf_counter() - t
        fresh = Chat(vlm, video, timestamps=False)
        fresh.messages = chat.messages[:2]
        sync()
        t = time.perf_counter()
        fresh.ask("Who is in the kitchen ?", one)
        sync()
        uncached = time.perf_counter() - t
        follow[visual] = {"with_cache": cached, "without_cache": uncached,
                          "prefilled_with_cache": chat.turns[-1].prefill_tokens,
                          "prefilled_without_cache": fresh.turns[-1].prefill_tokens}
        print(f"follow-up with {visual} visual tokens: {cached * 1000:.1f} ms with the kept cache "
              f"({chat.turns[-1].prefill_tokens} tokens prefilled) vs {uncached * 1000:.1f} ms without "
              f"({fresh.turns[-1].prefill_tokens} tokens)", flush=True)

    lines = ["# Prefill benchmark", "",
             f"Command: `python bench/bench_prefill.py --device {args.device} --dtype {args.dtype}`; "
             f"{platform.machine()}, {os.cpu_count()} cores, {args.device}, {args.dtype}. "
             f"LLaVA-shaped, Llama LM {LAYERS} layers, hidden {HIDDEN}, FFN {FFN}; "
             f"random weights; best of {args.repeats} after a warm-up.", "",
             "| visual tokens | prompt tokens | prefill ms | time ratio to 2880 | FLOPs ratio T(4nd^2+2n^2d+2ndm) |",
             "|---|---|---|---|---|",
             *[f"| {r['visual_tokens']} | {r['prompt_tokens']} | {r['seconds'] * 1000:.1f} | {r['time_ratio']:.3f} | "
               f"{r['flops_ratio']:.3f} |" for r in rows],
             "", "| follow-up question | with kept cache ms (tokens prefilled) | without cache ms (tokens prefilled) |",
             "|---|---|---|",
             *[f"| after {k} visual tokens | {v['with_cache'] * 1000:.1f} ({v['prefilled_with_cache']}) | "
               f"{v['without_cache'] * 1000:.1f} ({v['prefilled_without_cache']}) |" for k, v in follow.items()], ""]
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    tag = f"prefill_{args.device.split(':')[0]}_{args.dtype}"
    (out_dir / f"{tag}.json").write_text(json.dumps({"rows": rows, "follow_up": follow}, indent=2))
    (out_dir / f"{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
