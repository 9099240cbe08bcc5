"""Shared fixtures: numbered clips generated with PyAV (no binary test data in the repo)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from comfy_visionzip.testing.synthetic import make_clip

REPO = Path(__file__).resolve().parents[1]
REAL_CLIP = REPO.parent / "shared" / "media" / "flipping_a_pancake.mkv"


@pytest.fixture(scope="session")
def clip_factory(tmp_path_factory):
    """``clip_factory(name, **make_clip_kwargs)`` -> path of a generated numbered clip (cached per session)."""
    folder = tmp_path_factory.mktemp("clips")
    made: dict[str, str] = {}

    def make(name: str, **kwargs) -> str:
        key = name + hashlib.sha1(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:8]
        if key not in made:
            stem, ext = os.path.splitext(name)
            made[key] = make_clip(folder / f"{stem}-{key[-8:]}{ext}", **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def real_clip() -> str:
    """The real-world MKV in ../shared/media (its stream reports no frame count); skipped where absent."""
    if not REAL_CLIP.exists():
        pytest.skip(f"real-world clip not present at {REAL_CLIP}")
    return str(REAL_CLIP)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)`` -> folder of a tiny random checkpoint saved with save_pretrained (cached)."""
    from comfy_visionzip.testing.tiny import build_tiny

    root = tmp_path_factory.mktemp("models")
    made: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in made:
            made[family] = build_tiny(family, root / family)
        return made[family]

    return make


@pytest.fixture(scope="session")
def pack():
    """Load the repo root like ComfyUI's load_custom_node does (module named after the folder path)."""
    name = "ComfyUI-VisionZip-under-test"
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
