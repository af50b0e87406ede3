"""The stored `kan` kind: W = the sum of coarse-to-fine KanField levels (methods/kan fits them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import CompressedModule
from .field import evaluate, field_from_layout


class KanLinear(CompressedModule):
    """W = sum of the levels' KanField matrices (float16 parameters, computed in float32, cached)."""

    kind = "kan"

    def __init__(self, levels: list[dict[str, int]], bias: bool = False):
        super().__init__()
        self.levels_layout = levels
        self.levels = nn.ModuleList(field_from_layout(layout) for layout in levels)
        self.out_features, self.in_features = levels[0]["d_out"], levels[0]["d_in"]
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float16) if bias else None)
        self._cache: torch.Tensor | None = None

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._cache is None or self._cache.device != self.device():
            self._cache = evaluate(self.levels)[0]
        return self._cache.to(dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # new parameters: evaluate again
        super()._load_from_state_dict(*args, **kwargs)

    def layout(self) -> dict[str, Any]:
        return {"levels": self.levels_layout, "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "KanLinear":
        return cls(**layout)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        keys = {"d_out", "d_in", "code_dim", "hidden", "grid"}
        levels = layout["levels"]
        if not levels or any(set(level) != keys for level in levels):
            return f"levels must be a non-empty list of {{{', '.join(sorted(keys))}}}"
        if any(not 1 <= level[k] <= (1 << 12) for level in levels for k in ("code_dim", "hidden", "grid")):
            return "code_dim, hidden and grid must be in 1..4096"
        shapes = {(level["d_out"], level["d_in"]) for level in levels}
        return None if len(shapes) == 1 and min(next(iter(shapes))) >= 1 else "levels disagree on the shape"
