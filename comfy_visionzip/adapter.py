"""Projector adapters: a LLaVA-family model's multimodal projector tuned for compressed tokens.

VisionZip's paper has a second mode beside training-free (VisionZip‡): after compression the language model
sees far fewer visual tokens than it was trained on, and tuning only the projector closes most of that gap.
:func:`comfy_visionzip.tune.tune_projector` tunes one without labels; this module is the file it writes and
the way a loaded model uses it.

An adapter file is a safetensors file holding the projector's tuned weights (the same tensor names as the
model's ``multi_modal_projector``) and, in its metadata, what it was tuned for: the model's identity (its family,
widths and a fingerprint of the projector weights as the checkpoint stores them, so an adapter tuned for one
checkpoint is refused by another), the compression it was tuned for, the data and the distillation settings.
It is never a modified copy of the checkpoint: the checkpoint folder is only read.

Which families: those whose projector maps the tower's features to the language model after compression
(LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, Video-LLaVA, LLaVA-OneVision). Qwen2.5-VL and Qwen3-VL have no
such projector: their merger is the tower's last block, run before this pack compresses (the kept tokens are
already in the language model's width), so tuning it would need the merger's inputs, which compressed tokens
no longer hold; they are refused with that reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import VisionZipError

FORMAT = "comfyui-visionzip/projector-adapter/1"
PROJECTOR = "multi_modal_projector."
SUFFIX = ".safetensors"


def projector_of(model: Any) -> torch.nn.Module:
    """The model's own multimodal projector (``model.model.multi_modal_projector`` in transformers 5)."""
    for owner in (getattr(model, "model", None), model):
        module = getattr(owner, "multi_modal_projector", None) if owner is not None else None
        if isinstance(module, torch.nn.Module):
            return module
    raise VisionZipError("this model has no multimodal projector to tune or replace (only the LLaVA family has one: "
                         "Qwen2.5-VL / Qwen3-VL merge in the vision tower, before compression)")


def supports(vlm: Any) -> None:
    """Refuse a model whose family has no projector after compression, with the reason."""
    if not getattr(vlm, "can_answer", False):
        raise VisionZipError(f"{vlm.name} is a bare vision tower: there is no projector to tune")
    if vlm.family.model_type.startswith("qwen"):
        raise VisionZipError(f"{vlm.family.display} has no projector to tune after compression: its merger is the "
                             "vision tower's last block and runs before VisionZip keeps tokens, so the kept tokens "
                             "are already the language model's; projector adapters are for the LLaVA family")
    projector_of(vlm.model)


def fingerprint(folder: str | os.PathLike[str]) -> str:
    """A hash of the projector's tensors as the checkpoint folder stores them (names and bytes; independent of
    the dtype the model was loaded in)."""
    digest = hashlib.sha256()
    found = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(k for k in f.keys() if PROJECTOR in k):
                tensor = f.get_tensor(name).contiguous()
                digest.update(name.split(PROJECTOR, 1)[1].encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
                found += 1
    if not found:
        raise VisionZipError(f"{os.path.basename(os.path.normpath(folder))}: its weights hold no "
                             "multi_modal_projector tensors, so no adapter can be made for or applied to it")
    return digest.hexdigest()[:24]


def model_identity(vlm: Any) -> dict[str, Any]:
    """What an adapter must match: the family, the projector's widths and its stored weights' fingerprint."""
    cached = getattr(vlm, "_adapter_identity", None)
    if cached is not None:
        return dict(cached)
    supports(vlm)
    projector = projector_of(vlm.model)
    shapes = {k: list(v.shape) for k, v in projector.state_dict().items()}
    identity = {"family": vlm.family.model_type, "model": vlm.name, "projector": fingerprint(vlm.path),
                "shapes": shapes}
    vlm._adapter_identity = dict(identity)
    return identity


@dataclass
class Adapter:
    """A tuned projector and what it was tuned for (see the module's docstring)."""

    weights: dict[str, torch.Tensor]
    model: dict[str, Any]  # model_identity() of the model it was tuned on
    tuned_for: dict[str, Any]  # method, dominant, contextual, tokens_per_frame
    data: dict[str, Any] = field(default_factory=dict)  # what it was tuned on (files, frames, prompts)
    settings: dict[str, Any] = field(default_factory=dict)  # how (distillation choices, steps, minutes)
    path: str = ""

    @property
    def id(self) -> str:
        """A short hash of the weights: what tokens and chats record to tell adapters apart."""
        digest = hashlib.sha256()
        for name in sorted(self.weights):
            digest.update(name.encode())
            digest.update(self.weights[name].detach().float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else f"adapter {self.id}"

    def describe(self) -> str:
        t = self.tuned_for
        return (f"{self.name} (tuned for {t.get('method')} {t.get('tokens_per_frame')} tokens per frame on "
                f"{self.model.get('model')})")

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the adapter (a new file; the folder must exist); returns its path."""
        target = Path(path)
        if target.suffix != SUFFIX:
            raise VisionZipError(f"{target.name}: an adapter file ends in {SUFFIX}")
        meta = {"format": FORMAT, "model": json.dumps(self.model), "tuned_for": json.dumps(self.tuned_for),
                "data": json.dumps(self.data), "settings": json.dumps(self.settings)}
        staging = target.with_name(f".{target.name}.partial")
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.weights.items()},
                  str(staging), metadata=meta)
        os.replace(staging, target)
        self.path = str(target)
        return str(target)


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """An adapter file; one clear line when it is missing, unreadable or not an adapter (no path beyond its name
    is shown: it may come from a shared workflow)."""
    name = os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        raise VisionZipError(f"adapter {name}: no such file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - a user's file: truncated, foreign, not safetensors
        raise VisionZipError(f"adapter {name}: not a readable safetensors file ({type(e).__name__}); "
                             "tune it again") from e
    if meta.get("format") != FORMAT:
        raise VisionZipError(f"adapter {name}: not a VisionZip projector adapter (its format is "
                             f"{str(meta.get('format'))[:60]!r}, expected {FORMAT!r})")
    try:
        parts = {key: json.loads(meta.get(key) or "{}") for key in ("model", "tuned_for", "data", "settings")}
    except ValueError as e:
        raise VisionZipError(f"adapter {name}: its description is damaged ({e}); tune it again") from e
    return Adapter(weights, parts["model"], parts["tuned_for"], parts["data"], parts["settings"], os.fspath(path))


def check_adapter(vlm: Any, adapter: Adapter) -> None:
    """Refuse an adapter tuned for another model, naming what differs."""
    mine = model_identity(vlm)
    theirs = adapter.model
    differences = []
    if theirs.get("family") != mine["family"]:
        differences.append(f"family {theirs.get('family')} vs {mine['family']}")
    if theirs.get("shapes") != mine["shapes"]:
        differences.append("projector shapes differ")
    if differences:
        raise VisionZipError(f"adapter {adapter.name} was tuned for {theirs.get('model', 'another model')}, not for "
                             f"{vlm.name}: {'; '.join(differences)}; tune an adapter for this model")
    if theirs.get("projector") != mine["projector"]:  # the same kind of model: another checkpoint or another build
        raise VisionZipError(f"adapter {adapter.name} does not fit {vlm.name}: it was tuned on a checkpoint of the "
                             f"same kind whose projector weights differ (another checkpoint, or another build or "
                             f"version of this one; its folder was named {theirs.get('model', '?')!r}); tune an "
                             "adapter for this model")
    if set(adapter.weights) != set(mine["shapes"]):
        raise VisionZipError(f"adapter {adapter.name}: its tensors do not match the projector's; tune it again")


def apply_adapter(vlm: Any, adapter: Adapter | str | os.PathLike[str] | None) -> Any:
    """Use ``adapter`` (an :class:`Adapter` or a file) as ``vlm``'s projector from now on (None: the model's own
    again). The model's own projector is left as it is; the adapter's is a copy on the model's device."""
    if adapter is None:
        vlm.adapter, vlm.adapter_module = None, None
        return vlm
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    check_adapter(vlm, adapter)
    own = projector_of(vlm.model)
    tuned = copy.deepcopy(own)
    tuned.load_state_dict({k: v.to(vlm.dtype) for k, v in adapter.weights.items()})
    tuned.requires_grad_(False).eval()
    vlm.adapter = adapter
    vlm.adapter_module = tuned.to(vlm.device)
    return vlm


def adapter_note(vlm: Any, method: str, dominant: int, contextual: int) -> str:
    """A line when ``vlm``'s adapter was tuned for other compression settings than these ("" when it fits or there
    is none): it still runs, but a projector tuned for 25 tokens per frame may answer worse at 64 than the
    model's own."""
    adapter = getattr(vlm, "adapter", None)
    if adapter is None:
        return ""
    t = adapter.tuned_for
    if (t.get("method"), t.get("dominant"), t.get("contextual")) == (method, dominant, contextual):
        return ""
    if method == "full":
        return (f"adapter {adapter.name} is for compressed tokens: these are full tokens, so they go through the "
                "model's own projector")
    used = f"{method} {dominant}+{contextual}" if method == "visionzip" else f"{method} {dominant + contextual}"
    return (f"adapter {adapter.name} was tuned for {t.get('method')} {t.get('dominant')}+{t.get('contextual')} "
            f"({t.get('tokens_per_frame')} tokens per frame), these tokens are {used}: answers may be worse than "
            "with the model's own projector (tune an adapter for these settings, or take it off)")
