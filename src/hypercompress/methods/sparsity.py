"""Shared pieces of the pruning methods: the config and mask selection (unstructured or N:M)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig, check


@dataclass
class SparsityConfig(MethodConfig):
    sparsity: float = 0.5         # fraction of each layer's weights set to zero (unstructured)
    pattern: str | None = None    # "N:M": keep N of every M consecutive inputs per row (e.g. 2:4)

    def validate(self) -> None:
        check(0 < self.sparsity < 1, f"sparsity={self.sparsity}: must be in (0, 1)")
        if self.pattern is not None:
            check(parse_pattern(self.pattern) is not None,
                  f"pattern={self.pattern!r}: expected N:M with 0 < N < M, e.g. 2:4")

    def n_m(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep 2 of every 4."""
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        return None
    return (n, m) if 0 < n < m else None


def keep_mask(score: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Keep the highest scores: per row (the `sparsity` lowest pruned), or N of every M per row.

    score: (out, in) -> bool (out, in). Ties are broken by position (stable sort), so the mask is
    deterministic.
    """
    rows, cols = score.shape
    if n_m is not None:
        n, m = n_m
        if cols % m:
            raise ValueError(f"in_features {cols} is not a multiple of M={m}")
        groups = score.reshape(rows, cols // m, m)
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    pruned = int(cols * sparsity)
    order = torch.sort(score, dim=1, stable=True).indices[:, :pruned]
    return torch.ones_like(score, dtype=torch.bool).scatter_(1, order, False)
