"""The saved workflows: UI files consistent with the nodes, API files run headless end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*_api.json"))


def _runner():
    spec = importlib.util.spec_from_file_location("run_headless", REPO / "workflows" / "run_headless.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_workflows_with_pictures():
    assert len(WORKFLOWS) >= 3
    for api in WORKFLOWS:
        stem = api.name[: -len("_api.json")]
        assert (api.parent / f"{stem}.json").exists() and (api.parent / f"{stem}.jpg").exists()


@pytest.mark.parametrize("api", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_matches_the_nodes(api, pack):
    ui = json.loads(api.with_name(api.name.replace("_api.json", ".json")).read_text())
    prompt = json.loads(api.read_text())
    mappings = pack.NODE_CLASS_MAPPINGS
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert {str(i) for i in by_id} == set(prompt)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[src]["outputs"][src_slot]["type"] == kind
    for node in ui["nodes"]:
        cls = mappings.get(node["type"])
        if cls is None:
            assert node["type"] in ("PreviewImage", "SaveImage")
            continue
        spec = cls.INPUT_TYPES()
        widgets = [name for section in ("required", "optional") for name, (kind, *rest) in spec.get(section, {}).items()
                   if (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"))
                   and not (rest and rest[0].get("forceInput"))]
        assert len(node["widgets_values"]) == len(widgets) + ("seed" in widgets), node["type"]
        for name, value in prompt[str(node["id"])]["inputs"].items():
            assert name in {n for s in spec.values() for n in s}, (node["type"], name)
            if not isinstance(value, list):
                kind = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
                if isinstance(kind, list):
                    assert value in kind or name in ("video", "model"), (node["type"], name, value)


@pytest.mark.parametrize("api", WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_runs_headless(api, tiny_model_dir, clip_factory, tmp_path):
    prompt = json.loads(api.read_text())
    overrides = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "VisionZipLoadVideo":
            overrides[f"{node_id}.path"] = clip_factory("wf.mkv", frames=150, options={"g": "30"})
            overrides[f"{node_id}.max_size"] = 128
        if node["class_type"] == "VisionZipLoadVLM":
            overrides[f"{node_id}.path"] = tiny_model_dir("llava_onevision")
        if node["class_type"] == "VisionZipSaveTokens":
            overrides[f"{node_id}.filename_prefix"] = str(tmp_path / "tokens")
        if node["class_type"] in ("VisionZipAnswer", "VisionZipChat"):
            overrides[f"{node_id}.max_new_tokens"] = 4
    lines = []
    out = _runner().run(prompt, out=tmp_path / "out", overrides=overrides, log=lines.append)
    answers = [r[0] for i, r in out["results"].items() if prompt[i]["class_type"] in ("VisionZipAnswer", "VisionZipChat")]
    assert answers and all(isinstance(a, str) and a for a in answers)
    if any(n["class_type"] == "PreviewImage" for n in prompt.values()):
        assert list((tmp_path / "out").glob("previewimage_*.png"))
    if any(n["class_type"] == "VisionZipSaveTokens" for n in prompt.values()):
        assert list(tmp_path.glob("tokens_00001.safetensors"))
    assert any("visual tokens" in line for line in lines)
