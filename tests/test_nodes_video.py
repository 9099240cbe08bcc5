"""The video nodes, imported the way ComfyUI imports the pack (a folder loaded as a package)."""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np
import pytest
import torch

from comfy_visionzip.testing.synthetic import read_frame_number


def test_mappings_ids_categories_and_tooltips(pack):
    mappings = pack.NODE_CLASS_MAPPINGS
    assert {"VisionZipLoadVideo", "VisionZipFrameBudget"} <= set(mappings)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(mappings)
    for node_id, cls in mappings.items():
        assert node_id.startswith("VisionZip")
        assert cls.CATEGORY.startswith("VisionZip/") and cls.CATEGORY.count("/") == 1
        assert callable(getattr(cls, cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        for name, section in spec.items():
            if name == "hidden":  # ComfyUI fills these (node id, prompt): never widgets
                assert all(isinstance(v, str) for v in section.values())
                continue
            for input_name, (_kind, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{input_name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is not None:  # **kwargs (or input_types) would make ComfyUI skip its own checks of every input
            params = inspect.signature(validate).parameters
            assert not any(p.kind is p.VAR_KEYWORD for p in params.values()) and "input_types" not in params, node_id
            assert len(params) == 1, f"{node_id}: each named input gets the message once more"


def test_no_comfy_import_and_no_side_effects(pack):
    # A folder named "comfy" beside the checkout (e.g. a ComfyUI install in the same parent folder) can be
    # picked up by the guarded `import comfy.*` as an empty namespace package; what matters is that no real
    # ComfyUI module was imported.
    comfy = sys.modules.get("comfy")
    assert comfy is None or getattr(comfy, "__file__", None) is None
    assert not {"folder_paths", "server", "comfy.model_management", "comfy.utils"} & set(sys.modules)


def test_load_video_outputs_preview_timestamps_and_handle(pack, clip_factory):
    path = clip_factory("node.mkv", frames=90, options={"g": "15"})
    node = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]()
    image, timestamps, handle, count = node.load(
        video="", mode="fps", num_frames=16, fps=5.0, every=30, start=0.0, end=0.0, max_frames=0,
        max_size=0, preview_frames=4, backend="auto", path=path)
    assert count == 15  # 3 s at 5 fps
    assert image.dtype == torch.float32 and image.shape == (4, 120, 160, 3)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    numbers = [read_frame_number((f.numpy() * 255).round().astype(np.uint8)) for f in image]
    indices, times = handle.plan()
    assert len(indices) == 15 and indices[:3] == [0, 6, 12]
    assert numbers == [0, 30, 54, 84]  # 4 of the 15 planned frames, first and last included
    assert timestamps == "0.000, 1.000, 1.800, 2.800"
    streamed = sum((c.indices for c in handle.iter(chunk_size=4)), [])
    assert streamed == indices


def test_load_video_validation_and_is_changed(pack, clip_factory, tmp_path):
    cls = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]
    message = cls.VALIDATE_INPUTS(video="gone.mp4")
    assert isinstance(message, str) and "'gone.mp4' is not in ComfyUI's input folder" in message
    assert "choose file to upload" in message
    assert cls.VALIDATE_INPUTS(video="") is True  # nothing picked: a path or a VIDEO link may be given
    path = clip_factory("node2.mp4", frames=10)
    assert cls.VALIDATE_INPUTS(video=path) is True
    before = cls.IS_CHANGED(video="", path=path)
    assert before == cls.IS_CHANGED(video="", path=path)
    os.utime(path, (1, 1))
    assert cls.IS_CHANGED(video="", path=path) != before
    kwargs = dict(mode="num_frames", num_frames=4, fps=1.0, every=1, start=0.0, end=0.0, max_frames=0, max_size=0,
                  preview_frames=4, backend="auto")
    with pytest.raises(ValueError, match="no video given: upload or pick a file"):
        cls().load(video="", **kwargs)
    with pytest.raises(ValueError, match="gone.mp4: file not found"):
        cls().load(video="", path=str(tmp_path / "gone.mp4"), **kwargs)
    assert "" in cls.INPUT_TYPES()["required"]["video"][0]  # the empty entry exists


def test_load_video_from_core_video_input(pack, clip_factory):
    path = clip_factory("core.mp4", frames=30)

    class CoreVideo:  # the part of comfy_api's VideoInput the node uses
        def get_stream_source(self):
            return path

    image, _ts, handle, count = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]().load(
        video="ignored.mp4", mode="every", num_frames=1, fps=1.0, every=10, start=0.0, end=0.0, max_frames=0,
        max_size=80, preview_frames=0, backend="auto", video_input=CoreVideo())
    assert count == 3 and image.shape == (3, 60, 80, 3)
    assert handle.source == path


def test_frame_budget_node(pack):
    node = pack.NODE_CLASS_MAPPINGS["VisionZipFrameBudget"]()
    out = node.plan(token_budget=2048, tokens_per_frame=17, reserved=0, max_frames=0)
    assert out["result"][0] == 120
    assert "120 frames x 17 tokens = 2040 of 2048" in out["ui"]["text"][0]
    with pytest.raises(ValueError, match="cannot hold one frame"):
        node.plan(token_budget=100, tokens_per_frame=576)


def test_core_video_without_a_stream_uses_its_frames(pack):
    # A VIDEO made from images (CreateVideo) raises in get_stream_source in ComfyUI; its frames are used.
    import torch

    from comfy_visionzip.testing.synthetic import draw_frame

    frames = torch.stack([torch.from_numpy(draw_frame(k, 64, 48)) for k in range(20)]).float() / 255

    class Components:
        images = frames
        frame_rate = 10

    class ComponentsVideo:
        def get_stream_source(self):
            raise ValueError("Could not determine output format")

        def get_components(self):
            return Components()

    image, timestamps, handle, count = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]().load(
        video="", mode="fps", num_frames=1, fps=2.0, every=1, start=0.0, end=0.0, max_frames=0, max_size=0,
        preview_frames=2, backend="auto", video_input=ComponentsVideo())
    assert count == 4 and timestamps == "0.000, 1.500"
    numbers = [read_frame_number((f.numpy() * 255).round().astype(np.uint8)) for f in image]
    assert numbers == [0, 15]
    chunks = list(handle.iter(chunk_size=3))
    assert sum((c.indices for c in chunks), []) == [0, 5, 10, 15]
    assert chunks[0].frames.dtype == torch.uint8


def test_interval_mode_takes_one_frame_every_so_many_seconds(pack, clip_factory):
    path = clip_factory("interval.mp4", frames=90)  # 3 s at 30 fps
    node = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]()
    _image, timestamps, handle, count = node.load(video="", mode="interval", num_frames=1, fps=1.0, every=1, start=0.0,
                                                  end=0.0, max_frames=0, max_size=0, preview_frames=0, backend="auto",
                                                  path=path, interval=1.5)
    assert count == 2 and timestamps == "0.000, 1.500"
    fps = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"].INPUT_TYPES()["required"]["fps"][1]
    assert fps["step"] == 0.0001 and fps["min"] <= round(1 / 60, 4)  # typed 0.0167 stays 0.0167 in the web page


def test_load_vlm_with_nothing_picked_says_so(pack):
    node = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVLM"]
    assert node.VALIDATE_INPUTS(model="") is True
    with pytest.raises(ValueError, match="no model given"):
        node().load(model="", dtype="auto", device="cpu", quantization="none", attention="sdpa", keep_loaded=True)
    message = node.VALIDATE_INPUTS(model="llava-missing")
    assert "'llava-missing' is not in ComfyUI/models/visionzip" in message


def test_load_video_keyframe_seek_and_decode_workers(pack, clip_factory):
    path = clip_factory("sparse.mp4", frames=600, size=(96, 64), options={"g": "50", "bf": "2"})
    node = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"]()
    kwargs = dict(video="", mode="num_frames", num_frames=9, fps=1.0, every=1, start=0.0, end=0.0, max_frames=0,
                  max_size=0, preview_frames=0, backend="auto", path=path)
    _image, exact, handle, _count = node.load(**kwargs)
    assert handle.seek == "exact" and handle.workers is None  # a workflow saved before these inputs: as before
    image, snapped, handle, count = node.load(**kwargs, seek="keyframe", decode_workers=2)
    assert handle.seek == "keyframe" and handle.workers == 2 and count == 9 and image.shape[0] == 9
    assert snapped.split(", ")[1] == "1.667" and exact.split(", ")[1] == "2.500"  # frame 50 (a keyframe), not 75
    optional = pack.NODE_CLASS_MAPPINGS["VisionZipLoadVideo"].INPUT_TYPES()["optional"]
    assert optional["seek"][0] == ["exact", "keyframe"] and optional["decode_workers"][1]["default"] == 0
