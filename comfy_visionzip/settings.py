"""The user's compression options, parsed and checked once where they come in (the command line, a
node, a public Python function) into one typed :class:`Compression` that travels to the encoder, the
planner and the temporal stage. Nothing below the edge parses or checks them again.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .errors import VisionZipError
from .temporal import Temporal
from .zip import METHODS, split_tokens


@dataclass(frozen=True)
class Compression:
    """How each frame is compressed, and whether the temporal stage runs across frames."""

    method: str = "visionzip"  # visionzip, or a baseline: full (nothing dropped), pool, uniform
    dominant: int = 54  # tokens per image kept by attention (visionzip; the CLS token counts as one)
    contextual: int = 10  # tokens per image merged from the rest (visionzip); the baselines keep dominant + contextual
    temporal: Temporal | None = None  # the stage across frames (None: off)
    auto: bool = False  # the budget planner picks dominant + contextual (tokens_per_frame "auto")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise VisionZipError(f"unknown compression method {self.method!r}; valid: {', '.join(METHODS)}")
        for name, low in (("dominant", 1), ("contextual", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise VisionZipError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.temporal is not None and self.method == "full":
            raise VisionZipError("the temporal stage drops repeats among compressed tokens: use it with method "
                                 "visionzip, pool or uniform, not 'full'")
        if self.auto and self.method != "visionzip":
            raise VisionZipError(f"tokens_per_frame 'auto' chooses VisionZip settings; method is {self.method!r}")

    @classmethod
    def parse(
        cls,
        *,
        method: str = "visionzip",
        dominant: int = 54,
        contextual: int = 10,
        tokens_per_frame: int | str | None = None,
        temporal: Temporal | float | int | str | bool | None = None,
    ) -> Compression:
        """From the options as users give them: ``tokens_per_frame`` (None/0: ``dominant`` + ``contextual``;
        a number: split with the paper's ratio; "auto": chosen by the planner) and ``temporal`` (see
        :meth:`Temporal.parse`)."""
        auto = tokens_per_frame == "auto"
        if tokens_per_frame not in (None, 0, "auto"):
            if not isinstance(tokens_per_frame, int):
                raise VisionZipError(f"tokens_per_frame must be a number of tokens or 'auto', got {tokens_per_frame!r}")
            dominant, contextual = split_tokens(tokens_per_frame)
        return cls(method=method, dominant=dominant, contextual=contextual, temporal=Temporal.parse(temporal),
                   auto=auto)

    @property
    def tokens_per_image(self) -> int:
        return self.dominant + self.contextual

    def with_counts(self, dominant: int, contextual: int) -> Compression:
        return dataclasses.replace(self, dominant=dominant, contextual=contextual, auto=False)

    def with_temporal_budget(self, budget: int | None) -> Compression:
        """The same settings with the temporal stage held to ``budget`` visual tokens (the planner's room)."""
        if self.temporal is None:
            return self
        return dataclasses.replace(self, temporal=self.temporal.with_budget(budget))

    def describe(self) -> str:
        return (f"{self.method} {self.dominant}+{self.contextual}" if self.method == "visionzip"
                else f"{self.method} {self.tokens_per_image}")
