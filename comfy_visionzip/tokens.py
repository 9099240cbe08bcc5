"""The compressed tokens of a video (:class:`CompressedVideo`), what they are made with, and whether a
model can use them.

Only this accumulates while a long video streams through sample -> encode -> zip. Every token set
records the model identity it was made with (family, tower, select layer, grid, width, preprocessing;
see :meth:`~comfy_visionzip.models.base.VisionLanguageModel.token_identity`), so tokens from another
model are refused with what differs (:func:`check_compatible`). Thinning frames (:meth:`CompressedVideo.select`)
lives here; matching repeats again after a thinning is the temporal stage's (:func:`comfy_visionzip.temporal.thin`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import VisionZipError
from .preprocess import Preprocess
from .words import counted, frames_as_units, unit_name

# what a token set's identity records, and how a difference is named
IDENTITY_NAMES = {"family": "family", "vision_hidden": "vision width", "grid": "patch grid",
                  "select_layer": "select layer", "tower_layers": "tower layers", "select_strategy": "feature strategy",
                  "tower": "vision tower config"}


@dataclass
class CompressedVideo:
    """The compressed visual tokens of a video (or an image batch), ready for the model's projector.

    Only this accumulates while a long video streams through sample -> encode -> zip.
    """

    tokens: torch.Tensor  # (frames, crops * tokens_per_crop, D) on the CPU, the tower's dtype
    timestamps: list[float]  # seconds, one per frame (empty when unknown, e.g. a plain IMAGE batch)
    indices: list[int]  # source frame numbers
    method: str
    dominant: int
    contextual: int
    crops: int = 1
    grid: tuple[int, int] = (0, 0)
    cls_token: bool = True
    scores: torch.Tensor | None = None  # (frames * crops, S') float16, for heatmaps
    assignment: torch.Tensor | None = None  # (frames * crops, S) int16: output token carrying each input token
    preprocess: Preprocess | None = None  # how frames were turned into pixels (to draw heatmaps on frames)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # model name, settings (for saving and checking)
    # (frames, K) int32: the position in its image's token sequence each token stands at (CLS 0 where there is
    # one; a contextual token at its target's); for the Qwen families these give the 3D rotary positions
    positions: torch.Tensor | None = None
    # (frames, K) int32, with the temporal stage: the flat index (frame * K + slot) of the token each token
    # repeats, its own when it is kept (see comfy_visionzip.temporal); None: every token is kept
    repeats: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def keep(self) -> torch.Tensor | None:
        """(frames, K) bool: the tokens that reach the model (None: all of them)."""
        if self.repeats is None:
            return None
        own = torch.arange(self.repeats.numel(), dtype=torch.long).view(self.repeats.shape)
        return self.repeats.long() == own

    @property
    def total_tokens(self) -> int:
        """Visual tokens that reach the model (the temporal stage's repeats left out)."""
        keep = self.keep
        return self.num_frames * self.tokens_per_frame if keep is None else int(keep.sum())

    @property
    def frames_per_unit(self) -> int:
        """Sampled frames per encoded frame (Qwen: two per temporal patch; 1 for every other family)."""
        return max(1, int(self.meta.get("frames_per_unit", 1)))

    @property
    def sampled_frames(self) -> int:
        """Frames of the video these tokens stand for (Qwen: two per temporal patch, less a repeated last one)."""
        return self.num_frames * self.frames_per_unit - int(self.meta.get("repeated_frames", 0))

    def frames_text(self, where: str = "") -> str:
        """The frames in words, as the model encoded them: "7 frames", or for Qwen "7 frames = 4 temporal
        patches of 2 frames (the last frame repeated)"; a single picture without times: "1 image"."""
        if self.num_frames == 1 and not self.timestamps and self.frames_per_unit > 1:
            return "1 image" + where
        return frames_as_units(self.sampled_frames, self.frames_per_unit, where)

    def frame_tokens(self) -> list[int]:
        """Tokens each frame gives the model."""
        keep = self.keep
        return [self.tokens_per_frame] * self.num_frames if keep is None else keep.sum(1).tolist()

    def spans(self) -> torch.Tensor | None:
        """(frames, K) int: for each kept token the last frame (position in this video) it stands for."""
        if self.repeats is None:
            return None
        frames = torch.arange(self.num_frames).repeat_interleave(self.tokens_per_frame)
        last = torch.zeros(self.repeats.numel(), dtype=torch.long)
        last.scatter_reduce_(0, self.repeats.long().flatten(), frames, reduce="amax")
        return last.view(self.repeats.shape)

    def select(self, frames: Sequence[int]) -> CompressedVideo:
        """A copy holding only the given frames (positions into this video, ascending), maps included."""
        keep = sorted({int(f) for f in frames})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_frames:
            raise VisionZipError(f"frames {keep[:4]}... are not all in 0..{self.num_frames - 1}")
        crops = max(self.crops, 1)
        rows = torch.tensor([f * crops + c for f in keep for c in range(crops)], dtype=torch.long)
        repeats = None
        if self.repeats is not None:  # a repeat of a frame left out stands for itself
            per = self.tokens_per_frame
            new_frame = torch.full((self.num_frames,), -1, dtype=torch.long)
            new_frame[keep] = torch.arange(len(keep))
            old = self.repeats[keep].long()
            old_frame, slot = old // per, old % per
            mapped = new_frame[old_frame] * per + slot
            own = torch.arange(len(keep) * per, dtype=torch.long).view(len(keep), per)
            repeats = torch.where(new_frame[old_frame] >= 0, mapped, own).to(torch.int32)
        meta = dict(self.meta)
        if keep[-1] != self.num_frames - 1:  # the temporal patch holding a repeated frame was left out
            meta.pop("repeated_frames", None)
        thinned = dataclasses.replace(
            self, tokens=self.tokens[keep], timestamps=[self.timestamps[f] for f in keep] if self.timestamps else [],
            indices=[self.indices[f] for f in keep] if self.indices else [],
            scores=self.scores[rows] if self.scores is not None else None,
            assignment=self.assignment[rows] if self.assignment is not None else None, meta=meta,
            positions=self.positions[keep] if self.positions is not None else None, repeats=repeats)
        return thinned

    def validate(self) -> None:
        """Refuse tokens whose parts do not fit together (what a tokens file from elsewhere may hold): dtypes,
        shapes, ranges, finiteness. One line, naming the part."""
        tokens = self.tokens
        if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point() or tokens.dim() != 3:
            raise VisionZipError("the tokens must be a float tensor (frames, tokens, width)")
        frames, per, width = tokens.shape
        if frames < 1 or per < 1 or width < 1:
            raise VisionZipError(f"the tokens are empty (shape {tuple(tokens.shape)})")
        if not bool(torch.isfinite(tokens).all()):
            raise VisionZipError("the tokens hold NaN or infinite values")
        for name, values in (("timestamps", self.timestamps), ("indices", self.indices)):
            if len(values) not in (0, frames):
                raise VisionZipError(f"{len(values)} {name} for {counted(frames, 'frame')}")
        unit = self.meta.get("frames_per_unit", 1)
        if isinstance(unit, bool) or not isinstance(unit, int) or not 1 <= unit <= 16:
            raise VisionZipError(f"frames_per_unit must be a whole number of frames 1..16, not {str(unit)[:40]!r}")
        repeated = self.meta.get("repeated_frames", 0)
        if isinstance(repeated, bool) or not isinstance(repeated, int) or not 0 <= repeated < unit:
            raise VisionZipError(f"repeated_frames must be a whole number 0..{unit - 1} (frames repeated to fill the "
                                 f"last temporal patch), not {str(repeated)[:40]!r}")
        crops = max(self.crops, 1)
        if per % crops:
            raise VisionZipError(f"{counted(per, 'token')} per frame cannot be split into {crops} images")
        rows = frames * crops
        if self.scores is not None and (not self.scores.is_floating_point() or self.scores.dim() != 2
                                        or self.scores.shape[0] != rows or not bool(torch.isfinite(self.scores).all())):
            raise VisionZipError(f"the attention scores must be finite floats with {counted(rows, 'row')}")
        if self.assignment is not None:
            a = self.assignment
            if a.is_floating_point() or a.dim() != 2 or a.shape[0] != rows or (
                    a.numel() and (int(a.min()) < -1 or int(a.max()) >= per // crops)):
                raise VisionZipError(f"the token assignment must be whole numbers -1..{per // crops - 1} "
                                     f"with {counted(rows, 'row')}")
        for name, value in (("positions", self.positions), ("repeats", self.repeats)):
            if value is not None and (value.is_floating_point() or tuple(value.shape) != (frames, per)
                                      or (value.numel() and int(value.min()) < 0)):
                raise VisionZipError(f"the token {name} must be whole numbers >= 0 of shape ({frames}, {per})")
        if self.repeats is not None:
            flat = self.repeats.long().flatten()
            own = torch.arange(flat.numel())
            if bool((flat > own).any()) or bool((flat[flat] != flat).any()):
                raise VisionZipError("the temporal repeats must each point at an earlier kept token")

    def maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, assignment): the per-image maps heatmaps are drawn from (refused when they were not kept)."""
        if self.scores is None or self.assignment is None:
            raise VisionZipError("these tokens carry no attention maps (made with keep_maps off, or loaded from a file "
                                 "saved without them): encode the frames again to draw them")
        return self.scores, self.assignment

    def require_positions(self, why: str) -> torch.Tensor:
        """The token positions, or one line saying these tokens are too old for ``why``."""
        if self.positions is None:
            raise VisionZipError(f"these tokens carry no token positions (a tokens file of format 1, before they were "
                                 f"recorded), which {why} needs: encode the video again and save new tokens")
        return self.positions

    def summary(self, *, file_name_only: bool = False) -> str:
        """One line whose numbers add up: frames (and, for Qwen, the temporal patches they make) x tokens
        each = the visual tokens that reach the model, and how they were chosen. ``file_name_only``: name the
        source by its file name, not its path (what a web page shows)."""
        source = os.path.basename(self.source) if file_name_only and self.source else self.source
        where = f" of {source}" if source else ""
        crops = max(self.crops, 1)
        per_image = self.tokens_per_frame // crops
        image = "image" if crops > 1 or self.frames_per_unit == 1 else unit_name(self.frames_per_unit)
        every_token = self.method == "visionzip" and per_image < self.dominant + self.contextual  # Qwen's small frames
        if every_token:
            how = (f"visionzip: every token, as a {image} of this size has only {per_image}, "
                   f"fewer than the {self.dominant}+{self.contextual} asked")
        else:
            how = {"visionzip": f"visionzip: {self.dominant} dominant + {self.contextual} contextual per {image}",
                   "full": "full: every token, uncompressed"}.get(self.method,
                                                                   f"{self.method}: {per_image} tokens per {image}")
        each = f"{counted(self.tokens_per_frame, 'token')}" + (f" ({crops} images x {per_image})" if crops > 1 else "")
        head = f"{self.frames_text(where)} x {each}"
        if self.repeats is not None:
            every = self.num_frames * self.tokens_per_frame
            setting = self.meta.get("temporal") or {}
            segments = self.meta.get("temporal_segments", "?")
            # short: one box
            if self.method == "visionzip":
                how = "visionzip, every token" if every_token else f"visionzip {self.dominant}+{self.contextual}"
            thinned = self.meta.get("temporal_thinned")
            earlier = unit_name(self.frames_per_unit, plural=True)
            segments = counted(segments, "segment") if isinstance(segments, int) else f"{segments} segments"
            return (f"{head}, {counted(every - self.total_tokens, 'repeat')} of earlier {earlier} dropped = "
                    f"{counted(self.total_tokens, 'visual token')} ({how}; temporal {setting.get('threshold', '?')}: "
                    f"{segments}, {self.total_tokens / max(every, 1):.0%} kept{f'; {thinned}' if thinned else ''})")
        seek = f"; {self.meta['seek']}" if self.meta.get("seek") else ""
        return f"{head} = {counted(self.total_tokens, 'visual token')} ({how}){seek}"


def kept_count(video: CompressedVideo) -> int:
    """How many of each image's output tokens are kept tokens (drawn as such in previews)."""
    if video.method == "visionzip":
        per_image = video.tokens_per_frame // max(video.crops, 1)
        # a frame with no more tokens than asked for (Qwen's small frames) keeps every token
        return per_image if per_image < video.dominant + video.contextual else video.dominant
    if video.method in ("uniform", "full"):
        return video.tokens_per_frame // max(video.crops, 1)
    return 0  # pool: every token is a merge of a cell


def check_compatible(video: CompressedVideo, identity: dict[str, Any], preprocess: Preprocess, model: str) -> None:
    """Tokens made with another model (or tower, or settings) than ``identity`` describes cannot be
    projected by it: a clear error naming what differs (or that they do not say what made them)."""
    made = {**video.meta, "vision_hidden": int(video.tokens.shape[-1])}  # the tokens' own width is the truth
    missing = [label for key, label in IDENTITY_NAMES.items() if made.get(key) in (None, "")]
    if missing:
        raise VisionZipError(f"these tokens do not say which model made them (no {', '.join(missing)}), so {model} "
                             "cannot check it can use them: encode the video again with compress_video (or label "
                             "them with pipeline.label_tokens)")
    differences = []
    for key, label in IDENTITY_NAMES.items():
        theirs = made.get(key)
        if theirs in (None, ""):
            continue
        if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != identity[key]:
            differences.append(f"{label} {_shown(theirs)} vs {_shown(identity[key])}")
    if made.get("adapter") != identity.get("adapter"):  # tokens without the key were made without an adapter
        differences.append(f"projector adapter {made.get('adapter') or 'none'} vs {identity.get('adapter') or 'none'}")
    if video.preprocess is not None and video.preprocess != preprocess:
        differences.append(f"preprocessing {video.preprocess.describe()} vs {preprocess.describe()}")
    if differences:
        raise VisionZipError(
            f"these tokens were made with {made.get('model', 'another model')} "
            f"({made.get('family') or 'unknown family'}, "
            f"vision width {made['vision_hidden']}); {model} is {identity['family']} with vision width "
            f"{identity['vision_hidden']}; they differ in: {'; '.join(differences)}: "
            "encode the video again with this model"
        )


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        # a patch grid of 0x0: the encoder's grid follows each video's frame size (Qwen's dynamic resolution)
        return "per video (dynamic resolution)" if list(value) == [0, 0] else f"{value[0]}x{value[1]}"
    return str(value)
