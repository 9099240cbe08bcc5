"""Across frames: question-agnostic temporal compression on top of VisionZip.

VisionZip compresses each frame on its own; consecutive frames of real video repeat most of what they
show. This stage runs on VisionZip's output tokens (after the per-frame selection, so VisionZip's own
semantics stay exact and it works the same for every family, Qwen's temporal patches included):

  - a **reference map** holds, for every token cell (a patch of the grid; the CLS token is its own
    cell), the last token that was *kept* there in the current segment;
  - a token of the next frame **repeats** an earlier one when its feature (the token itself,
    L2-normalised) has cosine similarity >= ``threshold`` with a kept token at its own cell or a cell
    within ``radius`` of it (small motion); a repeated token is dropped, and the earlier token stands
    for it: its time span grows to this frame (``CompressedVideo.repeats`` says which token each one
    repeats). Comparing with kept tokens, not with the previous frame, means slow change accumulates
    and is kept once it is large enough, instead of drifting away unnoticed;
  - a **scene change** (the frame's mean token has cosine < ``scene`` with the previous frame's) starts
    a new segment: the reference map is cleared and the frame is kept whole; the first frame too;
  - every frame keeps at least its most novel token, so every frame still has its place (and its
    time) in the prompt;
  - with a ``budget`` (visual tokens for the whole video), the threshold is tightened after encoding
    (binary search down to ``floor``, on the stored tokens: nothing is encoded again) until the kept
    tokens fit; if even the floor keeps too many, frames are then thinned evenly by the chat's fit.

Why after VisionZip and not on the raw patches: the kept tokens are few (64 of 576), so matching is
cheap; VisionZip's per-frame choice of dominant and contextual tokens is untouched; and one stage
serves every family. It streams: it holds the current segment's reference map (one token per cell),
never a frame's uncompressed patches. It is question-agnostic: the same tokens serve every question,
so the KV cache keeps serving follow-ups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import VisionZipError
from .tokens import CompressedVideo
from .video.plan import uniform_pick
from .words import counted, part_of


@dataclass(frozen=True)
class Temporal:
    """Settings of the temporal stage (see the module docstring)."""

    threshold: float = 0.95  # cosine similarity at which a token repeats an earlier kept one (see bench_temporal)
    radius: int = 1  # cells around a token's own where the earlier token may be (0: the same cell only)
    scene: float = 0.8  # frame similarity below which a new segment starts (the frame is kept whole)
    budget: int | None = None  # visual tokens the whole video may keep (the threshold is tightened to fit)
    floor: float = 0.5  # the lowest threshold a budget may tighten to

    def __post_init__(self) -> None:
        for name in ("threshold", "scene", "floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise VisionZipError(f"temporal {name} must be a cosine similarity in -1..1, got {value!r}")
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or not 0 <= self.radius <= 4:
            raise VisionZipError(f"temporal radius must be an integer 0..4 (cells), got {self.radius!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise VisionZipError(f"temporal budget must be a number of tokens >= 1, got {self.budget!r}")

    @classmethod
    def parse(cls, value: Temporal | float | int | str | bool | None, *, name: str = "temporal") -> Temporal | None:
        """None / False / 0: off; True: the defaults; a float in (0, 1]: the threshold; an int >= 2: a budget
        of visual tokens (default threshold); a Temporal: itself; "0.85" / "4000" strings likewise."""
        if value is None or value is False or value == 0 or value == "":
            return None
        if isinstance(value, Temporal):
            return value
        if value is True:
            return cls()
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise VisionZipError(f"{name} {value!r}: give a threshold (0.95) or a token budget (4000)") from None
        if isinstance(value, float) and 0 < value <= 1:
            return cls(threshold=value)
        if isinstance(value, (int, float)) and value >= 2 and float(value).is_integer():
            return cls(budget=int(value))
        raise VisionZipError(f"{name} {value!r}: a threshold in (0, 1] (e.g. 0.9) or a token budget >= 2 (e.g. 4000)")

    def with_budget(self, budget: int | None) -> Temporal:
        return dataclasses.replace(self, budget=budget)


class Matcher:
    """The streaming state: the current segment's reference map and the previous frame's descriptor.

    ``frame(features, cells, offset)`` takes one frame's tokens (K, D) and their cells (K,) (positions in
    the frame's token sequence, offset by crop) and returns, for each token, the flat index (into the
    whole video's frames x K tokens) of the token it repeats: its own index when it is kept.
    """

    def __init__(self, config: Temporal, grid: tuple[int, int], *, cls_token: bool, crops: int = 1) -> None:
        self.config = config
        self.rows, self.cols = (int(v) for v in grid)
        self.prefix = 1 if cls_token else 0
        self.per_crop = self.prefix + self.rows * self.cols
        self.cells = self.per_crop * max(crops, 1)
        self.neighbours = self._neighbours(max(crops, 1))
        self.reference: torch.Tensor | None = None  # (cells, D) normalised features of kept tokens
        self.owner = torch.full((self.cells,), -1, dtype=torch.long)
        self.previous: torch.Tensor | None = None
        self.segments = 0

    def _neighbours(self, crops: int) -> torch.Tensor:
        r = self.config.radius
        offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        table = torch.full((self.cells, len(offsets)), -1, dtype=torch.long)
        for crop in range(crops):
            base = crop * self.per_crop
            for p in range(self.prefix):  # CLS: only itself
                table[base + p, 0] = base + p
            for y in range(self.rows):
                for x in range(self.cols):
                    cell = base + self.prefix + y * self.cols + x
                    for j, (dy, dx) in enumerate(offsets):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < self.rows and 0 <= xx < self.cols:
                            table[cell, j] = base + self.prefix + yy * self.cols + xx
        return table

    def video(self, part: CompressedVideo, first_frame: int, width: int | None = None) -> torch.Tensor:
        """(frames, K) int32 repeats of a compressed part whose first frame is ``first_frame`` of the video."""
        cells = crop_cells(part.require_positions("the temporal stage"), part.crops, self.per_crop)
        feats = token_features(part, width)
        per = part.tokens_per_frame
        return torch.stack([self.frame(feats[f], cells[f], (first_frame + f) * per)
                            for f in range(part.num_frames)]).to(torch.int32)

    def frame(self, features: torch.Tensor, cells: torch.Tensor, offset: int) -> torch.Tensor:
        count = features.shape[0]
        own = torch.arange(offset, offset + count)
        feats = torch.nn.functional.normalize(features.float(), dim=-1)
        cells = cells.long().clamp(0, self.cells - 1)
        descriptor = torch.nn.functional.normalize(feats.mean(0), dim=0)
        new_scene = self.previous is None or float(descriptor @ self.previous) < self.config.scene
        self.previous = descriptor
        if self.reference is None:
            self.reference = torch.zeros(self.cells, feats.shape[1])
        if new_scene:
            self.owner.fill_(-1)
            self.segments += 1
            source = own
        else:
            near = self.neighbours[cells]  # (K, n)
            valid = near >= 0
            near = near.clamp(min=0)
            valid &= self.owner[near] >= 0
            sims = torch.einsum("kd,knd->kn", feats, self.reference[near])
            sims = sims.masked_fill(~valid, -2.0)
            best, which = sims.max(1)
            repeat = best >= self.config.threshold
            if bool(repeat.all()):  # every frame keeps at least its most novel token
                repeat[int(best.argmin())] = False
            source = torch.where(repeat, self.owner[near.gather(1, which[:, None])[:, 0]], own)
        kept = source == own
        self.reference[cells[kept]] = feats[kept]
        self.owner[cells[kept]] = own[kept]
        return source


def token_features(video: CompressedVideo, width: int | None = None) -> torch.Tensor:
    """(frames, K, D) the features tokens are compared with (the family's main width, DeepStack left out)."""
    tokens = video.tokens
    return tokens[..., :width] if width else tokens


def apply(video: CompressedVideo, config: Temporal | None, *, width: int | None = None) -> CompressedVideo:
    """Run the stage over a whole compressed video (the same result as while streaming); returns a copy
    with ``repeats`` set (or without it, for ``config`` None)."""
    if config is None:
        return dataclasses.replace(video, repeats=None)
    if video.method == "full":  # stored tokens: their method is a fact, not an option
        raise VisionZipError("the temporal stage drops repeats among compressed tokens; these tokens are uncompressed "
                             "('full'): encode with method visionzip, pool or uniform")
    matcher = Matcher(config, video.grid, cls_token=video.cls_token, crops=video.crops)
    out = dataclasses.replace(video, repeats=matcher.video(video, 0, width))
    describe(out, config, matcher, width)
    return out


def describe(video: CompressedVideo, config: Temporal, matcher: Matcher, width: int | None) -> None:
    """Record the stage's settings with the tokens (summaries, tokens files, re-matching after a thinning)."""
    video.meta = {**video.meta, "temporal": {"threshold": round(float(config.threshold), 4), "radius": config.radius,
                                             "scene": config.scene, "budget": config.budget},
                  "temporal_segments": matcher.segments, "temporal_width": width}


def crop_cells(positions: torch.Tensor, crops: int, per_crop: int) -> torch.Tensor:
    """(frames, crops * K) positions in each crop's sequence -> cell ids unique within the frame."""
    positions = positions.long()
    if crops <= 1:
        return positions
    per = positions.shape[1] // crops
    crop_of = torch.arange(positions.shape[1]) // per
    return positions + crop_of * per_crop


def thin(video: CompressedVideo, frames: Sequence[int]) -> CompressedVideo:
    """``video`` with only the given frames, their repeats matched again with the settings the stage ran
    with (a token that repeated a frame left out may now repeat another kept one, or be kept)."""
    thinned = video.select(frames)
    setting = video.meta.get("temporal")
    if video.repeats is None or not setting:
        return thinned
    config = Temporal(threshold=setting["threshold"], radius=setting["radius"], scene=setting["scene"])
    return apply(thinned, config, width=video.meta.get("temporal_width"))


def fit(video: CompressedVideo, config: Temporal, budget: int, *, width: int | None = None) -> CompressedVideo:
    """Tighten the threshold (down to ``config.floor``) until the kept tokens fit ``budget``; returns the
    video with the loosest threshold that fits. When even the floor keeps too many (constant motion), the
    floor's video is thinned evenly to the most frames that fit (their repeats matched again)."""
    best = apply(video, config, width=width)
    if best.total_tokens <= budget:
        return best
    low, high = float(config.floor), float(config.threshold)
    floor = apply(video, dataclasses.replace(config, threshold=low), width=width)
    if floor.total_tokens > budget:
        lo, hi = 1, floor.num_frames  # the most frames whose kept tokens fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if thin(floor, uniform_pick(floor.num_frames, mid)).total_tokens <= budget:
                lo = mid
            else:
                hi = mid - 1
        thinned = thin(floor, uniform_pick(floor.num_frames, lo))
        shown = part_of(lo, floor.num_frames, thinned.sampled_frames, floor.sampled_frames, floor.frames_per_unit)
        thinned.meta["temporal_thinned"] = f"{shown} kept to fit {counted(budget, 'token')}"
        return thinned
    best = floor
    for _ in range(12):  # ~0.0001 in threshold
        middle = (low + high) / 2
        trial = apply(video, dataclasses.replace(config, threshold=middle), width=width)
        if trial.total_tokens <= budget:
            low, best = middle, trial
        else:
            high = middle
    return best


__all__ = ["Matcher", "Temporal", "apply", "crop_cells", "describe", "fit", "thin"]
