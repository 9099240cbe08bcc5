"""Qwen's 3D (time, height, width) rotary positions for a prompt whose video was compressed.

The model's own ``get_rope_index`` runs on the uncompressed layout of the first prompt (every cell of
every temporal patch), and each kept token is read at its own cell (a contextual token at its
target's); the text after the video keeps the positions it has without compression. After the first
prompt (generated answers, follow-ups) every token continues from the largest position + 1, which is
what the uncompressed model's ``generate`` does (``rope_deltas``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VisionZipError
from ..words import counted


@dataclass
class VideoCells:
    """Where the kept tokens of a compressed video sit in its uncompressed layout."""

    grid: tuple[int, int]  # merged-token rows, cols of every temporal patch
    positions: torch.Tensor  # (units, K) the cell each token stands at
    keep: torch.Tensor | None  # (units, K) bool: the tokens the temporal stage kept (None: all)
    spacing: float  # seconds between temporal patches (Qwen2.5-VL's absolute-time ids)
    merge: int  # the merger's side (2): patches per merged token along each axis


def first_prompt_positions(rope_owner: Any, cells: VideoCells, ids: list[int], kind: str,
                           token_id: int) -> torch.Tensor:
    """(3, len(ids)) positions of the first prompt: the model's own rope index on the uncompressed layout,
    read at each kept token's own cell (and at every text token)."""
    rows, cols = cells.grid
    per_unit = rows * cols
    units, per = cells.positions.shape
    keep = cells.keep
    slots = [(u, k) for u in range(units) for k in range(per) if keep is None or bool(keep[u, k])]
    full: list[int] = []
    where: list[int] = []
    seen = base = 0
    for token in ids:
        if token == token_id:
            if seen >= len(slots):
                raise VisionZipError(f"the prompt holds more visual tokens than the video's {len(slots)}")
            unit, slot = slots[seen]
            if seen == 0 or slots[seen - 1][0] != unit:  # the unit's uncompressed cells start here
                base = len(full)
                full.extend([token_id] * per_unit)
            where.append(base + int(cells.positions[unit, slot]))
            seen += 1
        else:
            where.append(len(full))
            full.append(token)
    if seen != len(slots):
        raise VisionZipError(f"the prompt holds {counted(seen, 'visual token')}, the video {len(slots)}")
    input_ids = torch.tensor([full])
    grid_thw = torch.tensor([[units, rows * cells.merge, cols * cells.merge]])
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    params = inspect.signature(rope_owner.get_rope_index).parameters  # its arguments differ across transformers
    if kind == "image":
        kwargs["image_grid_thw"] = grid_thw
    else:
        kwargs["video_grid_thw"] = grid_thw
        if "second_per_grid_ts" in params:
            kwargs["second_per_grid_ts"] = torch.tensor([cells.spacing])
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = (input_ids == token_id).int() * (1 if kind == "image" else 2)
    full_positions, _delta = rope_owner.get_rope_index(**{k: v for k, v in kwargs.items() if k in params})
    return full_positions[:, 0, torch.tensor(where)]


def continued(head: torch.Tensor, length: int) -> torch.Tensor:
    """(3, length): the first prompt's positions ``head``, then one more per token after its largest position."""
    rest = length - head.shape[1]
    if rest <= 0:
        return head[:, :length]
    tail = torch.arange(rest).view(1, -1).expand(3, -1) + head.max() + 1
    return torch.cat([head, tail], dim=1)
