"""Run an API-format workflow of this pack without ComfyUI (what CI and scripts use).

    python workflows/run_headless.py workflows/api/long_video_qa_api.json \
        --set 1.path=/videos/talk.mp4 --set 2.path=/models/llava-onevision-qwen2-0.5b-ov-hf --out out/

In every shipped workflow node 1 is the video (Load Video) and node 2 the model (Load VLM), so the two
``--set`` above work for each of them. The pack is loaded the way ComfyUI loads it. The whole graph is
validated first, as ComfyUI does (node types, required inputs, links and their types, combo values,
numbers against min/max, cycles, then each node's VALIDATE_INPUTS), after the file itself (JSON, size,
nesting, node ids or inputs given twice) and the ``--set`` targets: every problem is one line naming the
node, its type and the input, and nothing runs (exit code 2). Then nodes run in dependency order (no
recursion, so a graph of any length and order runs); files go to
``--out`` (PreviewImage / SaveImage PNGs and Save Tokens files); the text a node shows in ComfyUI is
printed.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import inspect
import json
import math
import numbers
import os
import reprlib
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
MAX_BYTES = 32 << 20  # an API-format workflow is a few KB; a bigger file is not one
MAX_DEPTH = 16  # prompt -> node -> inputs -> value (a link is a list): 4 levels are used
MAX_LINES = 20  # problems printed; the rest are counted

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 60, 60, 3, 6, 4


class WorkflowError(ValueError):
    """The workflow (or an override) is not valid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _show(value) -> str:
    """A short repr of anything a workflow holds (bounded in length and depth)."""
    return _REPR.repr(value)


def _id(node_id) -> str:
    text = str(node_id)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "text", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


class _Object(dict):
    """A JSON object that remembers which keys it was given more than once."""

    repeated: list


def _pairs(items) -> _Object:
    obj = _Object()
    obj.repeated = []
    for key, value in items:
        if key in obj:
            obj.repeated.append(key)
        obj[key] = value
    return obj


def _check_shape(prompt) -> None:
    """Refuse JSON nested deeper than any workflow, and keys given twice (JSON keeps only the last one)."""
    stack = [(prompt, 1, ())]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise WorkflowError([f"the workflow nests more than {MAX_DEPTH} levels deep (an API-format workflow nests "
                                 "4: node id -> node -> inputs -> value); it is not a workflow"])
        if isinstance(value, dict):
            for key in getattr(value, "repeated", [])[:1]:
                if not where:
                    raise WorkflowError([f"node id {_show(key)} appears more than once in the workflow (JSON keeps "
                                         "only the last one): give each node its own id"])
                if len(where) == 1:
                    what = f"{_show(key)} is given"
                elif len(where) == 2 and where[1] == "inputs":
                    what = f"input {_show(key)} is given"
                else:
                    what = f"{_show('.'.join(map(str, where[1:])))} gives {_show(key)}"
                raise WorkflowError([f"node {_id(where[0])}: {what} more than once (JSON keeps only the last one): "
                                     "keep one"])
            stack.extend((v, depth + 1, (*where, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, where) for v in value)


def read_workflow(path: Path):
    """The API-format graph in ``path`` (a ``{"prompt": ...}`` body of /prompt too); WorkflowError if not."""
    if not path.exists():
        raise WorkflowError([f"{path}: no such workflow file"])
    if not path.is_file():
        raise WorkflowError([f"{path}: not a file; give the path of an API-format workflow (.json)"])
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise WorkflowError([f"{path}: {size >> 20} MB is too big for a workflow (an API-format workflow is a "
                                 "few KB); give the API-format .json"])
        data = path.read_bytes()
    except OSError as e:
        raise WorkflowError([f"{path}: cannot be read ({e.strerror or e}); check its permissions"]) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkflowError([f"{path}: not a JSON workflow (not UTF-8 text at byte {e.start})"]) from e
    try:
        prompt = json.loads(text, object_pairs_hook=_pairs)
    except RecursionError as e:
        raise WorkflowError([f"{path}: not a JSON workflow (nested too deeply to read; an API-format workflow nests "
                             "4 levels)"]) from e
    except ValueError as e:
        raise WorkflowError([f"{path}: not a JSON workflow ({e})"]) from e
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), dict) and "class_type" not in prompt["prompt"]:
        if "prompt" in prompt.repeated:  # the body ComfyUI's /prompt takes: {"prompt": graph, ...}
            raise WorkflowError([f'{path}: "prompt" is given more than once: keep one'])
        prompt = prompt["prompt"]
    _check_shape(prompt)
    return prompt


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
    except (ValueError, RecursionError):
        return value


def parse_overrides(items: list[str]) -> dict:
    """``NODE.INPUT=VALUE`` strings -> {"NODE.INPUT": value}; malformed ones are WorkflowErrors."""
    overrides, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        node_id, dot, name = key.partition(".")
        if not sep or not dot or not node_id.strip() or not name.strip():
            problems.append(f"--set {_show(item)}: expected NODE.INPUT=VALUE, e.g. --set 1.path=/videos/clip.mp4")
            continue
        parsed = _parse(value)
        try:
            _check_shape(parsed)
        except WorkflowError:
            problems.append(f"--set {_id(key)}: the value nests more than {MAX_DEPTH} levels deep; give a number, "
                            "text, true/false or a link [node_id, output_index]")
            continue
        overrides[f"{node_id.strip()}.{name.strip()}"] = parsed
    if problems:
        raise WorkflowError(problems)
    return overrides


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and not isinstance(value[0], bool)
            and isinstance(value[0], (str, int)) and isinstance(value[1], int) and not isinstance(value[1], bool))


def _known(class_type: str, mappings) -> str:
    """Which node types this runner knows, briefly, with the closest one to ``class_type``."""
    pack = [name for name in mappings if isinstance(name, str)]
    close = difflib.get_close_matches(class_type[:100], [*pack, *CORE], n=1)
    short = [name[len("VisionZip"):] if name.startswith("VisionZip") else name for name in pack]
    return ((f"did you mean {close[0]!r}? " if close else "")
            + f"this runner knows VisionZip{{{', '.join(short)}}} and the core {', '.join(CORE)}")


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
        if isinstance(value, str) and value in kind:
            return None
        return f"{_show(value)} is not one of {', '.join(_show(k) for k in kind[:12])}" + (
            " ..." if len(kind) > 12 else "")
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"{_show(value)} is not an integer"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{_show(value)} is not a number"
        if not math.isfinite(value):
            return f"{_show(value)} is not a finite number"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{_show(value)} is not true or false"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{_show(value)} is not text"
    elif kind == "FILE":
        if not isinstance(value, str) or not value or "\0" in value or not Path(value).is_file():
            return f"{_show(value)} is not a file (give its path, e.g. with --set NODE.INPUT=/path/to/file)"
        return None
    else:
        hint = " (a link is [node_id, output_index])" if isinstance(value, list) else ""
        return f"needs a link from a node's {kind} output, got the value {_show(value)}{hint}"
    low, high = options.get("min"), options.get("max")
    if low is not None and value < low:
        return f"{_show(value)} is below the minimum {low}"
    if high is not None and value > high:
        return f"{_show(value)} is above the maximum {high}"
    return None


def _links(node: dict) -> list[str]:
    """The ids of the nodes whose outputs ``node`` takes, in the order of its inputs."""
    inputs = node.get("inputs", {})
    return [str(value[0]) for value in inputs.values() if _is_link(value)] if isinstance(inputs, dict) else []


def _order(prompt: dict) -> tuple[list[str], list[str]]:
    """(every node after the nodes it takes inputs from, []) or ([], the nodes of a cycle). No recursion."""
    order: list[str] = []
    done: set[str] = set()
    for root in prompt:
        if root in done:
            continue
        stack = [(root, iter(_links(prompt[root])))]
        path = [root]
        while stack:
            node_id, pending = stack[-1]
            for source in pending:
                if source in done or source not in prompt:
                    continue
                if source in path:
                    return [], [*path[path.index(source):], source]
                stack.append((source, iter(_links(prompt[source]))))
                path.append(source)
                break
            else:
                stack.pop()
                path.pop()
                done.add(node_id)
                order.append(node_id)
    return order, []


def _structure(prompt, mappings) -> list[str]:
    """What makes ``prompt`` not a graph of known nodes (the cheap checks), one line each."""
    if not isinstance(prompt, dict) or not prompt:
        what = "has no nodes" if prompt == {} else f"is {_kind(prompt)}"
        return [f"the workflow {what}, not an API-format graph (a JSON object of node id -> {{class_type, inputs}}); "
                "export it from ComfyUI with 'Export (API)'"]
    if "nodes" in prompt and "links" in prompt:
        return ["this is a UI-format workflow (for drag-and-drop); run its API twin in workflows/api/ instead"]
    problems = []
    for node_id, node in prompt.items():
        where = f"node {_id(node_id)}"
        if not isinstance(node, dict):
            problems.append(f"{where}: is {_kind(node)}, not a node (an object with class_type and inputs)")
            continue
        if "class_type" not in node:
            problems.append(f"{where}: has no class_type (the node's type, e.g. \"VisionZipAnswer\")")
            continue
        class_type = node["class_type"]
        if not isinstance(class_type, str):
            problems.append(f"{where}: class_type is {_kind(class_type)} ({_show(class_type)}), not the name of a "
                            "node type (text, e.g. \"VisionZipAnswer\")")
            continue
        where = f"{where} ({_id(class_type)})"
        if class_type not in mappings and class_type not in CORE:
            problems.append(f"{where}: unknown node type; {_known(class_type, mappings)}")
            continue
        if not isinstance(node.get("inputs", {}), dict):
            problems.append(f"{where}: inputs is {_kind(node['inputs'])}, not an object of input name -> value "
                            "or link [node_id, output_index]")
    return problems


def validate(prompt, mappings) -> list[str]:
    """Every problem of an API-format workflow, one line each (empty when it can run).

    Cheap checks first, each stage only when the one before found nothing: the graph's shape and node types; inputs,
    values and links; cycles; then each node's own VALIDATE_INPUTS (which may look at the disk).
    """
    problems = _structure(prompt, mappings)
    if problems:
        return problems
    checks = []
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        where = f"node {_id(node_id)} ({_id(class_type)})"
        required, optional, _outputs = _spec(mappings, class_type)
        inputs = node.get("inputs", {})
        check = getattr(mappings.get(class_type), "VALIDATE_INPUTS", None)
        custom = set(inspect.signature(check).parameters) if check is not None else set()  # the node checks these
        bad = len(problems)
        missing = [name for name in required if name not in inputs]
        if len(missing) == 1:
            problems.append(f"{where}: required input {missing[0]!r} is missing")
        elif missing:
            problems.append(f"{where}: required inputs {', '.join(map(repr, missing))} are missing")
        for name, value in inputs.items():
            if name not in required and name not in optional:
                problems.append(f"{where}: has no input {_show(name)} (inputs: {', '.join([*required, *optional])})")
                continue
            kind, options = (required.get(name) or optional.get(name))
            if _is_link(value):
                source = prompt.get(str(value[0]))
                if source is None:
                    problems.append(f"{where}: input {name!r} links to node {_id(value[0])}, which does not exist")
                    continue
                outputs = _spec(mappings, source["class_type"])[2]
                if not 0 <= value[1] < len(outputs):
                    problems.append(f"{where}: input {name!r} links to output {value[1]} of node {_id(value[0])} "
                                    f"({source['class_type']}), which has {len(outputs)} outputs")
                    continue
                given = outputs[value[1]]
                wanted = "COMBO" if isinstance(kind, list) else kind
                if given != wanted and "*" not in (given, wanted):
                    problems.append(f"{where}: input {name!r} needs {wanted}, but node {_id(value[0])} "
                                    f"({source['class_type']}) output {value[1]} is {given}")
                continue
            if name in custom and isinstance(kind, list):  # the node checks the choice itself, but it is text
                why = None if isinstance(value, str) else f"{_show(value)} is not text (one of its list)"
            else:
                why = _check_value(kind, options, value)
            if why:
                problems.append(f"{where}: input {name!r}: {why}")
        if check is not None and len(problems) == bad:
            checks.append((where, check, {k: v for k, v in inputs.items() if k in custom and not _is_link(v)}))
    if problems:
        return problems
    _unused, cycle = _order(prompt)
    if cycle:
        named = [f"{_id(i)} ({_id(prompt[i]['class_type'])})" for i in cycle]
        if len(named) > 9:
            named = [*named[:4], f"... {len(cycle) - 5} more ...", *named[-4:]]
        return [f"the workflow has a cycle: node {' takes an input from node '.join(named)}; a node cannot depend on "
                "its own output, remove one of these links"]
    for where, check, given in checks:  # ComfyUI calls it with the constant inputs it names (links are not known yet)
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


def _apply(prompt, overrides: dict, mappings) -> list[str]:
    """Put ``overrides`` ({"2.path": value}) into ``prompt``; a line for each that cannot go where it says."""
    problems = []
    for key, value in overrides.items():
        node_id, _, name = key.partition(".")
        where = f"--set {_id(node_id)}.{_id(name)}"
        if not isinstance(prompt, dict) or node_id not in prompt:
            nodes = list(prompt)[:12] if isinstance(prompt, dict) else []
            problems.append(f"{where}: the workflow has no node {_id(node_id)}"
                            + (f" (nodes: {', '.join(map(_id, nodes))}{' ...' if len(prompt) > 12 else ''})"
                               if nodes else ""))
            continue
        node = prompt[node_id]
        if not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            what = f"is {_kind(node)}" if not isinstance(node, dict) else f"has inputs that are {_kind(node['inputs'])}"
            problems.append(f"{where}: node {_id(node_id)} {what}, not a node with inputs to set; fix node "
                            f"{_id(node_id)} in the workflow")
            continue
        class_type = node.get("class_type")
        if isinstance(class_type, str) and (class_type in mappings or class_type in CORE):
            required, optional, _outputs = _spec(mappings, class_type)
            if name not in required and name not in optional:
                problems.append(f"{where}: node {_id(node_id)} ({class_type}) has no input {_show(name)} "
                                f"(inputs: {', '.join([*required, *optional])})")
                continue
        node.setdefault("inputs", {})[name] = value
    return problems


def _check_out(out: Path) -> str | None:
    """Why files cannot be written under ``out`` (checked before anything runs), or None."""
    folder = Path(os.path.abspath(out))
    if folder.exists() and not folder.is_dir():
        return f"--out {out}: is a file, not a folder; give a folder for the files the workflow writes"
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {out}: {parent} is a file, so no folder can be made there; give another folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: {parent} is not writable; give a folder you can write to"
    return None


def run(prompt: dict, *, out: Path = Path("out"), overrides: dict | None = None, log=print) -> dict:
    """Validate then execute ``prompt`` (API format); returns {"results": {node id: outputs}, "ui": ...}.

    ``overrides``: {"2.path": value}. Raises WorkflowError (every problem, one line each) before any node
    runs, and ValueError naming the node when a node refuses its input while running.
    """
    _check_shape(prompt)
    try:
        prompt = json.loads(json.dumps(prompt))
    except (TypeError, ValueError) as e:
        raise WorkflowError([f"the workflow is not JSON data ({e})"]) from e
    mappings = load_pack()
    problems = _apply(prompt, overrides or {}, mappings)
    if problems:  # the command line first: the workflow is checked with the values it will run with
        raise WorkflowError(problems)
    problems = validate(prompt, mappings)
    if not problems:
        problems = [why] if (why := _check_out(out)) else []
    if problems:
        raise WorkflowError(problems)
    order, _cycle = _order(prompt)
    comfy = sys.modules[f"{PACK}.nodes._comfy"]
    comfy.set_output_directory(str(out))
    results: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    try:
        for node_id in order:  # every node after the nodes it takes inputs from
            node = prompt[node_id]
            inputs = {name: results[str(value[0])][value[1]] if _is_link(value) else value
                      for name, value in node.get("inputs", {}).items()}
            class_type = node["class_type"]
            if class_type in CORE:
                results[node_id] = _core(class_type, node_id, inputs, out, log)
                continue
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
    finally:
        comfy.set_output_directory(None)
        comfy.run_pending()  # the end of the run: a model loaded with keep_loaded off is freed now
    return {"results": results, "ui": ui}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input (value parsed as JSON when it can be)")
    parser.add_argument("--out", default="out", help="folder for every file the workflow writes (default: ./out)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        prompt = read_workflow(Path(args.workflow))
        run(prompt, out=Path(args.out), overrides=overrides)
    except WorkflowError as e:
        for line in e.problems[:MAX_LINES]:
            print(f"error: {_one_line(line)}", file=sys.stderr)
        if len(e.problems) > MAX_LINES:
            print(f"error: ... and {len(e.problems) - MAX_LINES} more problems", file=sys.stderr)
        return 2
    except ValueError as e:  # a node refused its input while running
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
