"""VisionZip token compression and the baselines it is compared with. Pure tensor functions.

``visionzip`` keeps, per image (or crop, or frame):
  1. dominant tokens: the CLS token (when there is one) plus the top (dominant - 1) patches by the
     select layer's attention score (CLS row summed over heads; without CLS: attention received);
     without CLS, the top ``dominant`` tokens. Kept in their original order.
  2. contextual tokens: the R remaining tokens (original order) are split uniformly into targets at
     0, step, 2*step, ... (the first ``contextual``; step = max(1, R // contextual)); every other
     remaining token joins the target whose L2-normalised key is most similar (dot product), and
     contextual token j = hidden(target j) + mean(hidden of the tokens that joined j).
  Output: dominant tokens, then contextual tokens in target order.

This is the reference semantics of VisionZip (Yang et al., CVPR 2025) exactly; ties in the score
ranking go to the earlier position (a stable sort), so results are deterministic on every device.

Baselines behind the same interface (``compress(method=...)``): ``full`` (no compression), ``pool``
(spatial average pooling to at most the same count) and ``uniform`` (evenly spaced patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import VisionZipError
from .video.plan import uniform_pick

METHODS = ("visionzip", "full", "pool", "uniform")
LATTICE_ASPECT = math.log(1.5)  # pool: how far the pooled lattice may stray from the patch grid's aspect


@dataclass
class ZipResult:
    """Compressed tokens and where they came from (for previews and checks).

    Positions index the input sequence ``hidden[:, s]`` (CLS at 0 when there is one).
    """

    tokens: torch.Tensor  # (B, K, D): dominant tokens then contextual tokens
    dominant_positions: torch.Tensor  # (B, n_dominant) long, ascending
    contextual_positions: torch.Tensor  # (B, n_contextual) long: the target token of each contextual token
    assignment: torch.Tensor  # (B, S) long: output token carrying each input position; -1 = dropped
    method: str = "visionzip"
    positions: torch.Tensor | None = None  # (B, K) the input position each output token stands at (Qwen families)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])


def token_cells(result: ZipResult) -> torch.Tensor:
    """(B, K) the input position each output token stands at: a kept token its own, a contextual token its
    target's, a pooled token the first position it covers."""
    if result.positions is not None:
        return result.positions
    batch, count = result.tokens.shape[:2]
    cells = torch.cat([result.dominant_positions, result.contextual_positions], dim=1)
    if cells.shape[1] == count:
        return cells
    seq = result.assignment.shape[1]
    if int(result.assignment.max()) >= count:  # tokens made by a resampler (uncompressed video): no cells of their own
        return torch.arange(count, device=result.tokens.device).expand(batch, -1)
    source = torch.arange(seq, device=result.assignment.device).expand(batch, -1)
    cells = torch.full((batch, count), seq, dtype=torch.long, device=result.assignment.device)
    valid = result.assignment >= 0
    cells.scatter_reduce_(1, result.assignment.clamp(min=0), torch.where(valid, source, torch.full_like(source, seq)),
                          reduce="amin")
    return cells


def _check_counts(seq_len: int, dominant: int, contextual: int, cls_token: bool) -> None:
    for name, value in (("dominant", dominant), ("contextual", contextual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VisionZipError(f"{name} must be an integer >= 0, got {value!r}")
    if cls_token and dominant < 1:
        raise VisionZipError("dominant counts the CLS token, so it must be >= 1 for an encoder with a CLS token")
    if dominant + contextual == 0:
        raise VisionZipError("dominant + contextual is 0: ask for at least one token")
    if dominant + contextual > seq_len:
        raise VisionZipError(
            f"asked for {dominant} dominant + {contextual} contextual = {dominant + contextual} tokens, "
            f"but each image has only {seq_len} tokens"
        )


def visionzip(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    *,
    cls_token: bool = True,
) -> ZipResult:
    """Compress (B, S, D) tokens to (B, dominant + contextual, D). See the module docstring.

    Args:
        hidden: (B, S, D) select-layer outputs, CLS at position 0 when ``cls_token``.
        scores: (B, S-1) CLS attention to each patch when ``cls_token``, else (B, S) attention received.
        keys: (B, S, Dk) the select layer's keys averaged over heads.
        dominant: dominant tokens to keep, the CLS token included.
        contextual: contextual tokens to make; 0 = dominant tokens only.

    Any float dtype and device; scores, keys and the merge are computed in float32 and the tokens are
    returned in ``hidden``'s dtype. Raises VisionZipError for counts that do not fit.
    """
    if hidden.dim() != 3 or keys.dim() != 3 or scores.dim() != 2:
        raise VisionZipError(
            f"expected hidden (B, S, D), scores (B, S'), keys (B, S, Dk); got {tuple(hidden.shape)}, "
            f"{tuple(scores.shape)}, {tuple(keys.shape)}"
        )
    B, S, D = hidden.shape
    expected = S - 1 if cls_token else S
    if scores.shape != (B, expected) or keys.shape[:2] != (B, S):
        raise VisionZipError(
            f"scores must be (B, {expected}) and keys (B, {S}, Dk) for hidden {tuple(hidden.shape)} "
            f"(cls_token={cls_token}); got scores {tuple(scores.shape)}, keys {tuple(keys.shape)}"
        )
    for name, value in (("hidden", hidden), ("scores", scores), ("keys", keys)):
        if not value.is_floating_point():
            raise VisionZipError(f"{name} must be a float tensor, got {value.dtype}")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise VisionZipError(f"{name} holds NaN or infinite values (a broken tower or a bad input)")
    if B == 0 or S == 0:
        raise VisionZipError(f"nothing to compress: hidden has shape {tuple(hidden.shape)}")
    _check_counts(S, dominant, contextual, cls_token)
    device = hidden.device

    # 1. Dominant: top tokens by score (stable: ties go to the earlier position), then original order.
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # (B, S')
    if cls_token:
        top = order[:, : dominant - 1] + 1  # patch i is sequence position i + 1
        top = torch.cat([torch.zeros(B, 1, dtype=top.dtype, device=device), top], dim=1)
    else:
        top = order[:, :dominant]
    dominant_pos = torch.sort(top, dim=1).values  # (B, dominant)
    dominant_tokens = hidden.gather(1, dominant_pos[..., None].expand(-1, -1, D))

    assignment = torch.full((B, S), -1, dtype=torch.long, device=device)
    assignment.scatter_(1, dominant_pos, torch.arange(dominant, device=device).expand(B, -1))
    if contextual == 0:
        empty = torch.empty(B, 0, dtype=torch.long, device=device)
        return ZipResult(dominant_tokens, dominant_pos, empty, assignment)

    # 2. Contextual: the R remaining tokens, in original order.
    remaining = torch.ones(B, S, dtype=torch.bool, device=device)
    remaining.scatter_(1, dominant_pos, False)
    R = S - dominant
    rest_pos = remaining.nonzero()[:, 1].view(B, R)  # (B, R) ascending (nonzero is row-major)
    rest_hidden = hidden.gather(1, rest_pos[..., None].expand(-1, -1, D)).float()  # (B, R, D)
    rest_keys = F.normalize(keys.gather(1, rest_pos[..., None].expand(-1, -1, keys.shape[2])).float(), dim=-1)

    step = max(1, R // contextual)
    targets = torch.arange(0, R, step, device=device)[:contextual]  # (C,) positions within the remainder
    is_target = torch.zeros(R, dtype=torch.bool, device=device)
    is_target[targets] = True
    others = (~is_target).nonzero()[:, 0]  # (R - C,)

    similarity = rest_keys[:, others] @ rest_keys[:, targets].transpose(1, 2)  # (B, R-C, C)
    choice = similarity.argmax(dim=2)  # (B, R-C): first maximum on ties
    sums = torch.zeros(B, contextual, D, dtype=torch.float32, device=device)
    sums.scatter_add_(1, choice[..., None].expand(-1, -1, D), rest_hidden[:, others])
    counts = torch.zeros(B, contextual, dtype=torch.float32, device=device)
    counts.scatter_add_(1, choice, torch.ones_like(choice, dtype=torch.float32))
    contextual_tokens = rest_hidden[:, targets] + sums / counts.clamp(min=1)[..., None]

    target_pos = rest_pos[:, targets]  # (B, C)
    assignment.scatter_(1, target_pos, dominant + torch.arange(contextual, device=device).expand(B, -1))
    assignment.scatter_(1, rest_pos[:, others], dominant + choice)
    tokens = torch.cat([dominant_tokens, contextual_tokens.to(hidden.dtype)], dim=1)
    return ZipResult(tokens, dominant_pos, target_pos, assignment)


def _grid_of(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != num_patches:
            raise VisionZipError(f"grid {grid} does not hold {num_patches} patches")
        return grid
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise VisionZipError(f"{num_patches} patches are not a square grid; pass grid=(rows, cols)")
    return side, side


def full(hidden: torch.Tensor, **_ignored: object) -> ZipResult:
    """No compression: every token, in order."""
    B, S, _D = hidden.shape
    positions = torch.arange(S, device=hidden.device).expand(B, -1)
    empty = torch.empty(B, 0, dtype=torch.long, device=hidden.device)
    return ZipResult(hidden, positions.clone(), empty, positions.clone(), method="full")


def uniform(hidden: torch.Tensor, num_tokens: int, *, cls_token: bool = True) -> ZipResult:
    """Evenly spaced patches (first and last included); the CLS token is kept and counts as one."""
    B, S, D = hidden.shape
    _check_counts(S, num_tokens, 0, cls_token)
    first = 1 if cls_token else 0
    picks = [first + p for p in uniform_pick(S - first, num_tokens - first)]
    positions = torch.tensor(([0] if cls_token else []) + picks, device=hidden.device).expand(B, -1)
    assignment = torch.full((B, S), -1, dtype=torch.long, device=hidden.device)
    assignment.scatter_(1, positions, torch.arange(positions.shape[1], device=hidden.device).expand(B, -1))
    empty = torch.empty(B, 0, dtype=torch.long, device=hidden.device)
    tokens = hidden.gather(1, positions[..., None].expand(-1, -1, D))
    return ZipResult(tokens, positions.clone(), empty, assignment, method="uniform")


def pool(hidden: torch.Tensor, num_tokens: int, *, cls_token: bool = True,
         grid: tuple[int, int] | None = None) -> ZipResult:
    """Average-pool the patch grid to the largest 2-D lattice with at most ``num_tokens`` tokens whose shape
    stays within 1.5x of the grid's own aspect (16 x 16 patches: 25 -> 5 x 5, 50 -> 7 x 7, 76 -> 8 x 9; never a
    strip like 10 x 5).

    The CLS token is kept (first) and counts as one. The result may hold fewer tokens than asked when the
    count has no fitting factorisation (e.g. 64 with CLS: 1 + 7x9 = 64; 50: 7 x 7 = 49).
    """
    B, S, D = hidden.shape
    _check_counts(S, num_tokens, 0, cls_token)
    first = 1 if cls_token else 0
    rows, cols = _grid_of(S - first, grid)
    budget = num_tokens - first
    if budget < 1:
        raise VisionZipError("pool needs room for at least one pooled token besides the CLS token")
    candidates = []  # (area, -aspect error, rows, cols): the largest lattice near the grid's aspect, then the closest
    for out_rows in range(1, min(rows, budget) + 1):
        out_cols = min(cols, budget // out_rows)
        aspect_error = abs(math.log(out_rows / out_cols) - math.log(rows / cols))
        candidates.append((out_rows * out_cols if aspect_error <= LATTICE_ASPECT else 0, -aspect_error, out_rows,
                           out_cols))
    _area, _err, out_rows, out_cols = max(candidates)
    patches = hidden[:, first:].reshape(B, rows, cols, D).permute(0, 3, 1, 2)  # (B, D, rows, cols)
    pooled = F.adaptive_avg_pool2d(patches.float(), (out_rows, out_cols)).to(hidden.dtype)
    pooled = pooled.permute(0, 2, 3, 1).reshape(B, out_rows * out_cols, D)
    # which pooled cell covers each patch (adaptive pooling bins: floor(i * out / in))
    r = torch.arange(rows, device=hidden.device) * out_rows // rows
    c = torch.arange(cols, device=hidden.device) * out_cols // cols
    cell = (r[:, None] * out_cols + c[None, :]).reshape(-1) + first
    assignment = torch.cat([torch.zeros(first, dtype=torch.long, device=hidden.device), cell]).expand(B, -1).clone()
    tokens = torch.cat([hidden[:, :first], pooled], dim=1)
    positions = torch.zeros(B, first, dtype=torch.long, device=hidden.device)
    empty = torch.empty(B, 0, dtype=torch.long, device=hidden.device)
    return ZipResult(tokens, positions, empty, assignment, method="pool")


def compress(
    hidden: torch.Tensor,
    scores: torch.Tensor | None,
    keys: torch.Tensor | None,
    dominant: int,
    contextual: int,
    *,
    method: str = "visionzip",
    cls_token: bool = True,
    grid: tuple[int, int] | None = None,
) -> ZipResult:
    """Compress with ``method`` (default VisionZip) to ``dominant + contextual`` tokens per image."""
    if method == "visionzip":
        if scores is None or keys is None:
            raise VisionZipError("visionzip needs the select layer's attention scores and keys")
        return visionzip(hidden, scores, keys, dominant, contextual, cls_token=cls_token)
    if method == "full":
        return full(hidden)
    if method == "uniform":
        return uniform(hidden, dominant + contextual, cls_token=cls_token)
    if method == "pool":
        return pool(hidden, dominant + contextual, cls_token=cls_token, grid=grid)
    raise VisionZipError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")


def split_tokens(total: int, *, contextual_share: float = 10 / 64) -> tuple[int, int]:
    """Split a tokens-per-image budget into (dominant, contextual) with the paper's ratio.

    The paper's LLaVA-1.5 settings are 54+10, 108+20, 162+30 (64/128/192): about 5.4 : 1.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise VisionZipError(f"tokens per image must be an integer >= 1, got {total!r}")
    contextual = int(round(total * contextual_share))
    contextual = min(max(contextual, 0), total - 1)
    return total - contextual, contextual
