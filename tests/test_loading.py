"""Incomplete checkpoints: a folder whose weights do not all fit the model (the projector's tensors deleted, a
tensor of another model) is refused in one line naming the first keys and the fix, instead of answering with random
weights; transformers' own table of missing keys never reaches stderr; tied weights (lm_head = the embeddings,
absent from the file by design) load as before."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from comfy_visionzip import VisionZipError
from comfy_visionzip.__main__ import main
from comfy_visionzip.models import FAMILIES
from comfy_visionzip.testing.tiny import build_tiny_tower
from comfy_visionzip.vlm import load_tower, load_vlm

# the tensors that turn the tower's features into the language model's embeddings, per family
PROJECTOR = {"qwen2_5_vl": "merger", "qwen3_vl": "merger"}
SUPPORTED = [f for f in FAMILIES if hasattr(transformers, FAMILIES[f].class_name)]


def _copy(tiny_model_dir, family, tmp_path):
    folder = tmp_path / family
    shutil.copytree(tiny_model_dir(family), folder)
    return folder


def _rewrite(folder, keep=lambda name: True, add=None):
    tensors = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if keep(k)}
    save_file({**tensors, **(add or {})}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _filters():
    return list(logging.getLogger("transformers.modeling_utils").filters)


@pytest.mark.parametrize("family", SUPPORTED)
def test_complete_checkpoints_load_cleanly(tiny_model_dir, family, capfd):
    before = _filters()
    load_vlm(tiny_model_dir(family), device="cpu")
    err = capfd.readouterr().err
    assert "MISSING" not in err and "missing" not in err.lower() and "LOAD REPORT" not in err
    assert _filters() == before  # transformers' logger as it was


@pytest.mark.parametrize("family", SUPPORTED)
def test_a_checkpoint_without_its_projector_is_refused_in_one_line(tiny_model_dir, tmp_path, family, capfd):
    folder = _copy(tiny_model_dir, family, tmp_path)
    part = PROJECTOR.get(family, "multi_modal_projector")
    _rewrite(folder, keep=lambda name: part not in name)
    before = _filters()
    with pytest.raises(VisionZipError) as error:
        load_vlm(str(folder), device="cpu")
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{folder}: the checkpoint's weights do not match the "
                                                f"{FAMILIES[family].display} model (")
    assert text.endswith("it is incomplete or from another model: download the checkpoint again")
    missing = text.split(" missing: ")[1].split(")")[0]
    assert part in missing and (" more" in missing or missing.count(part) == len(missing.split(", ")))
    err = capfd.readouterr().err
    assert "MISSING" not in err and "LOAD REPORT" not in err and "newly initialized" not in err
    assert _filters() == before


def test_an_unexpected_tensor_is_refused_naming_it(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, "llava", tmp_path)
    _rewrite(folder, add={"some_other_model.head.weight": torch.zeros(2, 2)})
    with pytest.raises(VisionZipError, match=r"\(1 unexpected: some_other_model\.head\.weight\); it is incomplete or "
                                             r"from another model: download the checkpoint again$"):
        load_vlm(str(folder), device="cpu")


def test_most_weights_missing_names_the_first_three_and_counts_the_rest(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, "llava", tmp_path)
    _rewrite(folder, keep=lambda name: "embed_tokens" in name)
    with pytest.raises(VisionZipError) as error:
        load_vlm(str(folder), device="cpu")
    missing = str(error.value).split(" missing: ")[1]
    assert len(missing.split(" and ")[0].split(", ")) == 3 and " more" in missing


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_tied_weights_absent_from_the_file_are_not_missing(tiny_model_dir, tmp_path, family):
    """Small checkpoints (LLaVA-OneVision-0.5B, Qwen2.5-VL-3B) tie lm_head to the embeddings and do not store it."""
    if not hasattr(transformers, FAMILIES[family].class_name):
        pytest.skip(f"this transformers has no {FAMILIES[family].class_name}")
    folder = _copy(tiny_model_dir, family, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    if "text_config" in config:
        config["text_config"]["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    _rewrite(folder, keep=lambda name: "lm_head" not in name)
    model = load_vlm(str(folder), device="cpu").model
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _tiny_tower(folder: Path) -> Path:
    return Path(build_tiny_tower(folder, layers=2))


def test_an_incomplete_tower_is_refused(tmp_path, capfd):
    folder = _tiny_tower(tmp_path / "tower")
    load_tower(folder, device="cpu")  # complete: loads
    _rewrite(folder, keep=lambda name: "layers.1." not in name)
    with pytest.raises(VisionZipError, match=r"the checkpoint's weights do not match the tower model \(\d+ missing: "
                                             r".*layers\.1\..*download the checkpoint again$"):
        load_tower(folder, device="cpu")
    assert "MISSING" not in capfd.readouterr().err


def test_the_command_line_refuses_an_incomplete_checkpoint_in_one_line(tiny_model_dir, tmp_path, clip_factory,
                                                                        capsys):
    folder = _copy(tiny_model_dir, "llava", tmp_path)
    _rewrite(folder, keep=lambda name: "multi_modal_projector" not in name)
    clip = clip_factory("loading.mp4", frames=10)
    assert main(["ask", clip, "q", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "download the checkpoint again" in err and "Traceback" not in err and "MISSING" not in err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # (its progress bar)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
