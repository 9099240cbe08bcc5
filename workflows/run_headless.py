"""Run an API-format workflow of this pack without ComfyUI (what CI and scripts use).

    python workflows/run_headless.py workflows/api/long_video_qa_api.json \
        --set 1.path=/videos/talk.mp4 --set 2.path=/models/llava-onevision-qwen2-0.5b-ov-hf --out out/

In every shipped workflow node 1 is the video (Load Video) and node 2 the model (Load VLM), so the two
``--set`` above work for each of them. The pack is loaded the way ComfyUI loads it. The whole graph is
validated first, as ComfyUI does (node types, required inputs, links and their types, combo values,
numbers against min/max, each node's VALIDATE_INPUTS): every problem is one line naming the node, its
type and the input, and nothing runs (exit code 2). Then nodes run in dependency order; files go to
``--out`` (PreviewImage / SaveImage PNGs and Save Tokens files); the text a node shows in ComfyUI is
printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import numbers
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "ComfyUI-VisionZip-headless"
CORE = {  # core nodes the workflows use, stood in for here: (inputs {name: type}, output types)
    "PreviewImage": ({"images": "IMAGE"}, []),
    "SaveImage": ({"images": "IMAGE"}, []),
    "LoadVideo": ({"file": "FILE"}, ["VIDEO"]),  # a file path (ComfyUI: a file of its input folder)
    "LoadImage": ({"image": "FILE"}, ["IMAGE", "MASK"]),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


class WorkflowError(ValueError):
    """The workflow (or an override) is not valid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def load_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK].NODE_CLASS_MAPPINGS


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


def parse_overrides(items: list[str]) -> dict:
    """``NODE.INPUT=VALUE`` strings -> {"NODE.INPUT": value}; malformed ones are WorkflowErrors."""
    overrides, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        node_id, dot, name = key.partition(".")
        if not sep or not dot or not node_id.strip() or not name.strip():
            problems.append(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set 1.path=/videos/clip.mp4")
            continue
        overrides[f"{node_id.strip()}.{name.strip()}"] = _parse(value)
    if problems:
        raise WorkflowError(problems)
    return overrides


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], (str, int)) and isinstance(value[1], int))


def _spec(mappings, class_type: str) -> tuple[dict, dict, list[str]]:
    """(required, optional, output types) of a node class."""
    if class_type in CORE:
        inputs, outputs = CORE[class_type]
        return {name: (kind, {}) for name, kind in inputs.items()}, {}, list(outputs)
    cls = mappings[class_type]
    spec = cls.INPUT_TYPES()
    unpack = lambda section: {n: (v[0], v[1] if len(v) > 1 else {}) for n, v in spec.get(section, {}).items()}  # noqa: E731
    return unpack("required"), unpack("optional"), list(cls.RETURN_TYPES)


def _check_value(kind, options: dict, value) -> str | None:
    """Why ``value`` is not valid for an input of ``kind`` (ComfyUI's own widget checks), or None."""
    if isinstance(kind, list):
        return None if value in kind else f"{value!r} is not one of {', '.join(map(repr, kind[:12]))}" + (
            " ..." if len(kind) > 12 else "")
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"{value!r} is not an integer"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{value!r} is not a number"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not text"
    elif kind == "FILE":
        if not isinstance(value, str) or not Path(value).is_file():
            return f"{value!r} is not a file (give its path, e.g. with --set NODE.INPUT=/path/to/file)"
        return None
    else:
        return f"needs a link from a node's {kind} output, got the value {value!r}"
    low, high = options.get("min"), options.get("max")
    if low is not None and value < low:
        return f"{value!r} is below the minimum {low}"
    if high is not None and value > high:
        return f"{value!r} is above the maximum {high}"
    return None


def validate(prompt, mappings) -> list[str]:
    """Every problem of an API-format workflow, one line each (empty when it can run)."""
    if not isinstance(prompt, dict) or not prompt:
        return ["the workflow is not an API-format graph (a JSON object of node id -> {class_type, inputs})"]
    if "nodes" in prompt and "links" in prompt:
        return ["this is a UI-format workflow (for drag-and-drop); run its API twin in workflows/api/ instead"]
    problems = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs", {}), dict):
            problems.append(f"node {node_id}: not a node (needs class_type and inputs)")
            continue
        class_type = node["class_type"]
        where = f"node {node_id} ({class_type})"
        if class_type not in mappings and class_type not in CORE:
            problems.append(f"{where}: unknown node type; this runner knows the pack's nodes and {', '.join(CORE)}")
            continue
        required, optional, _outputs = _spec(mappings, class_type)
        inputs = node.get("inputs", {})
        check = getattr(mappings.get(class_type), "VALIDATE_INPUTS", None)
        custom = set(inspect.signature(check).parameters) if check is not None else set()  # the node checks these
        for name in required:
            if name not in inputs:
                problems.append(f"{where}: required input {name!r} is missing")
        for name, value in inputs.items():
            if name not in required and name not in optional:
                problems.append(f"{where}: has no input {name!r} (inputs: {', '.join([*required, *optional])})")
                continue
            kind, options = (required.get(name) or optional.get(name))
            if _is_link(value):
                source = prompt.get(str(value[0]))
                if not isinstance(source, dict) or "class_type" not in source:
                    problems.append(f"{where}: input {name!r} links to node {value[0]}, which does not exist")
                    continue
                if source["class_type"] not in mappings and source["class_type"] not in CORE:
                    continue  # reported at that node
                outputs = _spec(mappings, source["class_type"])[2]
                if not 0 <= value[1] < len(outputs):
                    problems.append(f"{where}: input {name!r} links to output {value[1]} of node {value[0]} "
                                    f"({source['class_type']}), which has {len(outputs)} outputs")
                    continue
                given = outputs[value[1]]
                wanted = "COMBO" if isinstance(kind, list) else kind
                if given != wanted and "*" not in (given, wanted):
                    problems.append(f"{where}: input {name!r} needs {wanted}, but node {value[0]} "
                                    f"({source['class_type']}) output {value[1]} is {given}")
                continue
            why = None if name in custom else _check_value(kind, options, value)
            if why:
                problems.append(f"{where}: input {name!r}: {why}")
        if check is not None:  # ComfyUI calls it with the constant inputs it names (links are not known yet)
            given = {k: v for k, v in inputs.items() if k in custom and not _is_link(v)}
            try:
                verdict = check(**given)
            except Exception as e:  # noqa: BLE001 - a validator that fails is a problem of that node's input
                verdict = f"{type(e).__name__}: {e}"
            if verdict is not True:
                problems.append(f"{where}: {verdict}")
    return problems


class _VideoFile:
    """What a core VIDEO from ComfyUI's Load Video offers the pack: the file to stream from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get_stream_source(self) -> str:
        return self.path


def _core(class_type: str, node_id: str, inputs: dict, out: Path, log) -> tuple:
    """Stand-ins for the core nodes the shipped workflows use."""
    if class_type in ("PreviewImage", "SaveImage"):
        paths = _save_images(inputs["images"], out, f"{class_type.lower()}_{node_id}")
        log(f"[{node_id}] {class_type}: {len(paths)} images -> {out}")
        return ()
    if class_type == "LoadVideo":
        return (_VideoFile(str(Path(inputs["file"]).resolve())),)
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(inputs["image"]) as picture:
        rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255
    image = torch.from_numpy(rgb)[None]  # (1, H, W, 3), like ComfyUI's LoadImage
    return image, torch.zeros(image.shape[:3])


def run(prompt: dict, *, out: Path = Path("out"), overrides: dict | None = None, log=print) -> dict:
    """Validate then execute ``prompt`` (API format); returns {"results": {node id: outputs}, "ui": ...}.

    ``overrides``: {"2.path": value}. Raises WorkflowError (every problem, one line each) before any node
    runs, and ValueError naming the node when a node refuses its input while running.
    """
    mappings = load_pack()
    prompt = json.loads(json.dumps(prompt))
    problems = []
    for key, value in (overrides or {}).items():
        node_id, _, name = key.partition(".")
        if not isinstance(prompt, dict) or node_id not in prompt:
            problems.append(f"--set {key}: the workflow has no node {node_id}"
                            + (f" (nodes: {', '.join(prompt)})" if isinstance(prompt, dict) else ""))
            continue
        prompt[node_id].setdefault("inputs", {})[name] = value
    problems += validate(prompt, mappings)
    if problems:
        raise WorkflowError(problems)
    comfy = sys.modules[f"{PACK}.nodes._comfy"]
    comfy.set_output_directory(str(out))
    results: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    visiting: set[str] = set()

    def execute(node_id: str):
        if node_id in results:
            return results[node_id]
        if node_id in visiting:
            raise WorkflowError([f"the workflow has a cycle through node {node_id}"])
        visiting.add(node_id)
        node = prompt[node_id]
        inputs = {name: execute(str(value[0]))[value[1]] if _is_link(value) else value
                  for name, value in node["inputs"].items()}
        class_type = node["class_type"]
        if class_type in CORE:
            results[node_id] = _core(class_type, node_id, inputs, out, log)
            return results[node_id]
        cls = mappings[class_type]
        try:
            output = getattr(cls(), cls.FUNCTION)(**inputs)
        except ValueError as e:  # the library's errors (VisionZipError, VideoError) are ValueErrors
            raise ValueError(f"node {node_id} ({class_type}): {e}") from e
        if isinstance(output, dict):
            ui[node_id] = output.get("ui", {})
            for text in ui[node_id].get("text", []):
                log(f"[{node_id}] {class_type}: {text}")
            output = output.get("result", ())
        results[node_id] = output
        visiting.discard(node_id)
        return output

    try:
        for node_id in prompt:
            execute(node_id)
    finally:
        comfy.set_output_directory(None)
    return {"results": results, "ui": ui}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input (value parsed as JSON when it can be)")
    parser.add_argument("--out", default="out", help="folder for every file the workflow writes (default: ./out)")
    args = parser.parse_args(argv)
    try:
        path = Path(args.workflow)
        if not path.is_file():
            raise WorkflowError([f"{path}: no such workflow file"])
        try:
            prompt = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise WorkflowError([f"{path}: not a JSON workflow ({e})"]) from e
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), dict):
            prompt = prompt["prompt"]
        run(prompt, out=Path(args.out), overrides=parse_overrides(args.set))
    except WorkflowError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ValueError as e:  # a node refused its input while running
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
