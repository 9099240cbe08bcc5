"""Run an API-format workflow of this pack without ComfyUI (what CI and scripts use).

    python workflows/run_headless.py workflows/long_video_qa_api.json \
        --set 1.path=/videos/talk.mp4 --set 2.path=/models/llava-onevision-qwen2-0.5b-ov-hf --out out/

The pack is loaded the way ComfyUI loads it; nodes run in dependency order; the core PreviewImage /
SaveImage nodes write PNGs to --out; the text a node shows in ComfyUI is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_pack():
    name = "ComfyUI-VisionZip-headless"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].NODE_CLASS_MAPPINGS


def _save_images(images, out: Path, prefix: str) -> list[str]:
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out / f"{prefix}_{i:03d}.png"
        Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _parse(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def run(prompt: dict, *, out: Path = Path("out"), overrides: dict | None = None, log=print) -> dict:
    """Execute ``prompt`` (API format); returns {node id: outputs}. ``overrides``: {"2.path": value}."""
    mappings = load_pack()
    prompt = json.loads(json.dumps(prompt))
    for key, value in (overrides or {}).items():
        node_id, name = key.split(".", 1)
        if node_id not in prompt:
            raise ValueError(f"--set {key}: the workflow has no node {node_id}")
        prompt[node_id]["inputs"][name] = value
    results: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    visiting: set[str] = set()

    def execute(node_id: str):
        if node_id in results:
            return results[node_id]
        if node_id in visiting:
            raise ValueError(f"the workflow has a cycle through node {node_id}")
        visiting.add(node_id)
        node = prompt[node_id]
        inputs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                inputs[name] = execute(value[0])[value[1]]
            else:
                inputs[name] = value
        class_type = node["class_type"]
        if class_type in ("PreviewImage", "SaveImage"):
            paths = _save_images(inputs["images"], out, f"{class_type.lower()}_{node_id}")
            log(f"[{node_id}] {class_type}: {len(paths)} images -> {out}")
            results[node_id] = ()
            return ()
        if class_type not in mappings:
            raise ValueError(f"node {node_id}: {class_type!r} is not a node of this pack (headless runs need no others)")
        cls = mappings[class_type]
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is not None:
            verdict = validate(**{k: v for k, v in inputs.items() if not hasattr(v, "__dict__")})
            if verdict is not True:
                raise ValueError(f"node {node_id} ({class_type}): {verdict}")
        output = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(output, dict):
            ui[node_id] = output.get("ui", {})
            for text in ui[node_id].get("text", []):
                log(f"[{node_id}] {class_type}: {text}")
            output = output.get("result", ())
        results[node_id] = output
        visiting.discard(node_id)
        return output

    for node_id in prompt:
        execute(node_id)
    return {"results": results, "ui": ui}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input (value parsed as JSON when it can be)")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    prompt = json.loads(Path(args.workflow).read_text())
    prompt = prompt.get("prompt", prompt)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse(value)
    run(prompt, out=Path(args.out), overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
