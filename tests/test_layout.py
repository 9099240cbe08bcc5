"""The house keeps its shape: no import circle among the library's modules, nothing imported inside a
function but an optional dependency (named in a comment), the library never imports ComfyUI, and the
rooms the design names hold what they should (e.g. the tokens room never imports the temporal stage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "comfy_visionzip"
# what may be imported inside a function: optional dependencies (each with a comment naming why)
OPTIONAL = {"decord", "cv2", "onnx", "onnxruntime", "bitsandbytes", "huggingface_hub", "tqdm", "matplotlib",
            "transformers.vision_utils", "importlib.util", "ray"}


def _module(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_package: bool, level: int, name: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _graph() -> dict[str, set[str]]:
    """module -> library modules it imports at module level (type-only imports included: they are imports too)."""
    modules = {_module(p): p for p in LIB.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                target = _resolve(name, path.name == "__init__.py", node.level, node.module)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_circle_among_the_library_modules():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            # a package's __init__ re-exports its own modules: that is the package, not a circle
            if node.startswith(dep + ".") and graph.get(dep) and node in graph[dep]:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if not state.get(dep):
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


@pytest.mark.parametrize("room, never", [
    ("comfy_visionzip.tokens", {"comfy_visionzip.temporal", "comfy_visionzip.pipeline", "comfy_visionzip.vlm"}),
    ("comfy_visionzip.encoder", {"comfy_visionzip.tokens", "comfy_visionzip.pipeline", "comfy_visionzip.models"}),
    ("comfy_visionzip.zip", {"comfy_visionzip.encoder", "comfy_visionzip.tokens"}),
    ("comfy_visionzip.models.base", {"comfy_visionzip.vlm", "comfy_visionzip.pipeline", "comfy_visionzip.budget",
                                     "comfy_visionzip.answer", "comfy_visionzip.prompt", "comfy_visionzip.projection"}),
    ("comfy_visionzip.vlm", {"comfy_visionzip.pipeline", "comfy_visionzip.budget", "comfy_visionzip.answer"}),
])
def test_rooms_do_not_import_what_sits_above_them(room, never):
    reached, todo = set(), [room]
    graph = _graph()
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in reached:
                reached.add(dep)
                todo.append(dep)
    assert not {m for m in reached if any(m == n or m.startswith(n + ".") for n in never)}, room


def test_only_the_entry_points_use_the_probe_model():
    """The probe model (its world, its training, its bench helpers) sits on top of the library: only the command
    line and the demo import it, and nothing it imports comes back to it."""
    graph = _graph()
    probe = "comfy_visionzip.probe"
    users = {m for m, deps in graph.items() if any(d == probe or d.startswith(probe + ".") for d in deps)}
    assert users - {m for m in users if m.startswith("comfy_visionzip.probe")} == {"comfy_visionzip.__main__",
                                                                                  "comfy_visionzip.demo"}


def test_imports_are_at_the_top_except_optional_dependencies():
    for path in LIB.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = ["." * inner.level + (inner.module or "")]
                else:
                    continue
                where = f"{path.relative_to(LIB.parent)}:{inner.lineno}"
                assert all(n in OPTIONAL or n.split(".")[0] in OPTIONAL for n in names), \
                    f"{where}: {names} imported inside a function (only optional dependencies may be)"
                assert "#" in lines[inner.lineno - 1], f"{where}: say which optional dependency this is, in a comment"


def test_the_library_never_imports_comfyui():
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("comfy", "folder_paths", "server", "nodes") for n in names), path
