"""Family modules: one file per family behind one interface, one registry; shared code never branches on
the family."""

from __future__ import annotations

from pathlib import Path

import transformers

from comfy_visionzip.models import FAMILIES, FamilyModule
from comfy_visionzip.testing.tiny import ALL_FAMILIES as TINY

SHARED = ["answer.py", "projection.py", "prompt.py", "budget.py", "vlm.py", "encoder.py", "store.py"]


def test_every_family_is_a_module_in_the_registry():
    assert set(FAMILIES) == set(TINY)
    for model_type, family in FAMILIES.items():
        assert isinstance(family, FamilyModule) and family.model_type == model_type and family.display
        assert hasattr(transformers, family.class_name) or family.model_type == "qwen3_vl", family.class_name  # 4.57+
        assert family.video_input in ("image", "video")
        module = Path(__import__(type(family).__module__, fromlist=["_"]).__file__)
        assert module.parent.name == "models"  # its own file


def test_shared_code_does_not_branch_on_the_family():
    root = Path(__file__).resolve().parents[1] / "comfy_visionzip"
    for name in SHARED:
        text = (root / name).read_text()
        for model_type in FAMILIES:
            assert f'"{model_type}"' not in text, f"{name} names the family {model_type!r}: that belongs in models/"
