"""Model memory in a running ComfyUI (run by hand against a server you started; not a test).

    python bench/bench_comfyui_memory.py --url http://127.0.0.1:8188 --pid $(pgrep -f "main.py") \
        --model big-llava --video clip.mp4 [--cycles 4] [--warm-model tiny-llava]

What it does, through ComfyUI's HTTP API only (as a user's browser would): queue the ``long_video_qa``
workflow (API twin in workflows/api) with the given model folder (ComfyUI/models/visionzip/<model>) and input
video; after each run, ``POST /free {"unload_models": true}`` (the menu's "Unload Models"); then one run with
keep_loaded off, and a final ``/free`` with ``free_memory`` too. The server's RSS (``/proc/<pid>/status``, so
Linux only, on the same machine) is read after each step, once ComfyUI had time to act on the flags (its
prompt worker checks them within its 10 s garbage-collection interval). Each run changes the question so
that Answer runs again and needs the model. Writes bench/results/comfyui_memory.json and .md.

Read the rise per run and whether the level after each Unload stays flat across cycles (no leak). The first
run also imports code (transformers' model classes, the decoders) that stays in the process: ``--warm-model``
runs a tiny checkpoint first to show that level; compare the levels after Unload with it, not with the server
before its first run.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKFLOW = HERE.parent / "workflows" / "api" / "long_video_qa_api.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--pid", type=int, required=True, help="the ComfyUI server's process id")
    parser.add_argument("--model", required=True, help="a checkpoint folder in ComfyUI/models/visionzip")
    parser.add_argument("--video", required=True, help="a video in ComfyUI's input folder")
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--warm-model", default="", help="a tiny checkpoint run first, so the code a run imports "
                        "is in the process before the measured cycles (the level to compare with)")
    parser.add_argument("--settle", type=float, default=13.0, help="seconds to wait after POST /free")
    args = parser.parse_args()

    def rss() -> int:
        for line in open(f"/proc/{args.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
        raise RuntimeError("no VmRSS")

    def post(path: str, body: dict) -> bytes:
        request = urllib.request.Request(args.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return urllib.request.urlopen(request).read()

    def run(workflow: dict) -> dict:
        prompt_id = json.loads(post("/prompt", {"prompt": workflow, "client_id": "bench"}))["prompt_id"]
        while True:
            history = json.load(urllib.request.urlopen(f"{args.url}/history/{prompt_id}"))
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                break
            time.sleep(0.5)
        status = history[prompt_id]["status"]
        time.sleep(3)  # the pack frees after the queue is idle (it looks twice a second)
        cached = [m[1]["nodes"] for m in status["messages"] if m[0] == "execution_cached"]
        return {"status": status["status_str"], "cached_nodes": cached[0] if cached else [], "rss_mb": rss()}

    def free(body: dict) -> dict:
        post("/free", body)
        time.sleep(args.settle)
        return {"rss_mb": rss()}

    base = json.loads(WORKFLOW.read_text())
    base["1"]["inputs"].update(video=args.video, mode="num_frames", num_frames=8, max_frames=0)
    base["2"]["inputs"].update(model=args.model)
    base["4"]["inputs"].update(max_new_tokens=8)
    base["5"]["inputs"].update(max_new_tokens=8)
    steps = [{"step": "server before the first run", "rss_mb": rss()}]
    if args.warm_model:
        warm = copy.deepcopy(base)
        warm["2"]["inputs"]["model"] = args.warm_model
        steps.append({"step": f"run with {args.warm_model} (imports the code)", **run(warm)})
        steps.append({"step": "POST /free unload_models + free_memory",
                      **free({"unload_models": True, "free_memory": True})})
    for cycle in range(args.cycles):
        workflow = copy.deepcopy(base)
        workflow["4"]["inputs"]["question"] = f"What happens ({cycle})?"
        steps.append({"step": f"cycle {cycle}: run (keep_loaded on)", **run(workflow)})
        steps.append({"step": f"cycle {cycle}: POST /free unload_models", **free({"unload_models": True})})
    off = copy.deepcopy(base)
    off["2"]["inputs"]["keep_loaded"] = False
    off["4"]["inputs"]["question"] = "What happens (keep_loaded off)?"
    steps.append({"step": "run with keep_loaded off (no /free)", **run(off)})
    steps.append({"step": "POST /free unload_models + free_memory",
                  **free({"unload_models": True, "free_memory": True})})
    for step in steps:
        print(f"{step['step']:45s} {step['rss_mb']:6d} MB  {step.get('status', '')}")
    out = {"model": args.model, "video": args.video, "cycles": args.cycles, "steps": steps}
    (HERE / "results" / "comfyui_memory.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["| step | server RSS (MB) | status |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['rss_mb']} | {s.get('status', '')} |" for s in steps]
    (HERE / "results" / "comfyui_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
