"""Python API misuse gets the library's own one-line error, never a traceback from torch or a silent
wrong result (issue 17: empty batches, float 0..255 frames, NaN or integer tensors, bad devices)."""

from __future__ import annotations

import pytest
import torch

from comfy_visionzip import VisionZipError, visionzip
from comfy_visionzip.answer import GenerationConfig
from comfy_visionzip.devices import pick_device, pick_dtype
from comfy_visionzip.preprocess import as_uint8_frames

GOOD = (torch.randn(2, 5, 4), torch.rand(2, 4), torch.randn(2, 5, 3))


@pytest.mark.parametrize("which, value, message", [
    (1, torch.full((2, 4), float("nan")), "scores holds NaN"),
    (0, torch.full((2, 5, 4), float("inf")), "hidden holds NaN or infinite"),
    (1, torch.ones(2, 4, dtype=torch.long), "scores must be a float tensor"),
    (2, torch.ones(2, 5, 3, dtype=torch.int32), "keys must be a float tensor"),
])
def test_visionzip_refuses_nan_and_integer_tensors(which, value, message):
    args = list(GOOD)
    args[which] = value
    with pytest.raises(VisionZipError, match=message):
        visionzip(*args, 2, 1)


def test_visionzip_refuses_an_empty_batch():
    with pytest.raises(VisionZipError, match="nothing to compress"):
        visionzip(torch.randn(0, 5, 4), torch.rand(0, 4), torch.randn(0, 5, 3), 2, 1)


def test_frames_of_the_wrong_kind():
    with pytest.raises(VisionZipError, match="divide by 255"):
        as_uint8_frames(torch.rand(2, 8, 8, 3) * 255)  # 0..255 as floats would all become white
    with pytest.raises(VisionZipError, match="empty batch"):
        as_uint8_frames(torch.zeros(0, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(VisionZipError, match="NaN"):
        as_uint8_frames(torch.full((1, 4, 4, 3), float("nan")))
    with pytest.raises(VisionZipError, match="RGB .a tensor., got a list"):
        as_uint8_frames([1, 2, 3])  # type: ignore[arg-type]
    image = torch.rand(2, 8, 8, 3)  # a ComfyUI IMAGE
    assert torch.equal(as_uint8_frames(image), (image * 255).round().to(torch.uint8))


@pytest.mark.parametrize("device", ["banana", "meta", 3.5, "cuda:x"])
def test_devices_that_cannot_run_a_model(device):
    with pytest.raises(VisionZipError, match="unknown device"):
        pick_device(device)


def test_dtypes_and_seeds():
    with pytest.raises(VisionZipError, match="unknown dtype"):
        pick_dtype("fp8", torch.device("cpu"))
    for seed in (-1, 2**63, 1.5, True):
        with pytest.raises(VisionZipError, match="seed must be a whole number"):
            GenerationConfig(seed=seed).check()  # type: ignore[arg-type]
    GenerationConfig(seed=2**63 - 1).check()


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "did not finish rendering"),
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "roles must alternate"),
    ("{{ messages[0]['content'][7]['nope'] }}", "refused the conversation"),
])
def test_a_chat_template_that_loops_or_raises_is_one_line(template, message, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import comfy_visionzip.prompt as prompt
    from comfy_visionzip.answer import Chat
    from comfy_visionzip.pipeline import compress_frames, label_tokens
    from comfy_visionzip.vlm import load_vlm

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava"), folder)
    (folder / "chat_template.jinja").write_text(template)
    monkeypatch.setattr(prompt, "TEMPLATE_SECONDS", 0.5)
    vlm = load_vlm(folder, device="cpu")
    video = compress_frames(vlm.video_encoder(), [torch.zeros(2, 48, 48, 3, dtype=torch.uint8)], dominant=3,
                            contextual=1)
    label_tokens(vlm, video)
    with pytest.raises(VisionZipError, match=message) as error:
        Chat(vlm, video).ask("What ?", GenerationConfig(max_new_tokens=2))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family, change, message", [
    ("llava", {"size": {"shortest_edge": 50000}, "crop_size": {"height": 50000, "width": 50000}}, "50000 px images"),
    ("llava_next", {"image_grid_pinpoints": [[48, 48000]]}, "anyres grid"),
    ("qwen2_5_vl", {"min_pixels": 4_000_000_000, "max_pixels": 4_000_000_000}, "do not fit together"),
    ("qwen2_5_vl", {"patch_size": 7}, "patch size 7 is not the tower's"),
])
def test_processor_sizes_are_bounded_by_the_tower(family, change, message, tiny_model_dir, tmp_path):
    import json
    import shutil

    from comfy_visionzip.vlm import load_vlm

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(family), folder)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (folder / name).exists():
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**config, **change}))
    with pytest.raises(VisionZipError, match=message) as error:
        load_vlm(folder, device="cpu")  # refused as it loads, before any video
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family, marker", [("llava", "<image>"), ("llava_onevision", "<video>"),
                                            ("qwen2_5_vl", "<|video_pad|>"), ("qwen2_5_vl", "<|vision_start|>")])
def test_a_question_holding_the_models_own_marker_is_named(family, marker, tiny_model_dir, clip_factory):
    from comfy_visionzip.budget import plan_budget
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    with pytest.raises(VisionZipError, match="the question contains") as error:
        plan_budget(vlm, clip_factory("m.mp4", frames=20), f"what is {marker} here ?", num_frames=4)
    assert marker in str(error.value) and "\n" not in str(error.value)


def test_a_question_too_long_for_the_context_is_named(tiny_model_dir, clip_factory):
    from comfy_visionzip.budget import plan_budget
    from comfy_visionzip.vlm import load_vlm

    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    with pytest.raises(VisionZipError, match="the question is .* tokens long .*shorten the question"):
        plan_budget(vlm, clip_factory("m.mp4", frames=20), "what " * 5000, num_frames=4)


def test_a_placeholder_id_outside_the_vocabulary_is_one_line(tiny_model_dir, tmp_path):
    import json
    import shutil

    from comfy_visionzip.prompt import PromptBuilder
    from comfy_visionzip.vlm import load_vlm

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava"), folder)
    vlm = load_vlm(folder, device="cpu")
    vlm.config = {**json.loads((folder / "config.json").read_text()), "image_token_index": 10**9}
    with pytest.raises(VisionZipError, match="not in the tokenizer's vocabulary"):
        PromptBuilder(vlm)
