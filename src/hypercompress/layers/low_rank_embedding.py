"""A factorized token embedding: E (V, D) ~ A (V, r) B (r, D), and a tied lm_head that uses it.

Lookup: rows(ids) = A[ids] B; logits (tied head) = (x B^T) A^T, so neither path builds the (V, D)
table. A is stored in float16 or as `bits`-bit per-row codes (formats.row_codes: a float16 scale
and offset per row), B in float16. Storage: V r bits + 32 V (codes) or 16 V r, plus 16 r D.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import row_codes
from .base import CompressedModule, embedding_misfit


class LowRankEmbedding(CompressedModule):
    kind = "low_rank_embedding"
    own_path = "rows and logits through the rank-r factors"
    output_scale = 1.0  # rows x this (a scaled embedding's, Gemma: modules.carry_embedding_scale)
    compute_dtype = torch.float32  # dtype of the looked-up rows; artifact.load sets it

    def __init__(self, vocab: int, dim: int, rank: int, bits: int = 16):
        super().__init__()
        self.vocab, self.dim, self.rank, self.bits = vocab, dim, rank, bits
        self.out_features, self.in_features = vocab, dim  # as an lm_head: (V, D)
        if bits >= 16:
            self.register_buffer("table", torch.zeros(vocab, rank, dtype=torch.float16))
        else:
            self.register_buffer("codes", torch.zeros(row_codes.packed_size(vocab * rank, bits), dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(vocab, dtype=torch.float16))
            self.register_buffer("offset", torch.zeros(vocab, dtype=torch.float16))
        self.register_buffer("up", torch.zeros(rank, dim, dtype=torch.float16))
        self._table: torch.Tensor | None = None  # A decoded (float32), rebuilt after a load
        self._levels: torch.Tensor | None = None  # the codes as float32 levels (V, r)

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a (V, r), b (r, D): stored (A rounded to its codes)."""
        if self.bits >= 16:
            self.table.copy_(a.half())
        else:
            entry = row_codes.encode(a, self.bits)
            self.codes.copy_(entry["codes"]), self.scale.copy_(entry["scale"]), self.offset.copy_(entry["offset"])
        self.up.copy_(b.half())
        self._table = self._levels = None

    def factor_a(self) -> torch.Tensor:
        """A (V, r) in float32, as stored. While its stored tensors train (distillation: the table,
        or the per-row scale and offset of the codes) it is rebuilt with autograd at every call."""
        training = (self.table if self.bits >= 16 else self.scale).requires_grad
        if self._table is not None and self._table.device == self.up.device and not training:
            return self._table
        if self.bits >= 16:
            table = self.table.float()
        else:
            if self._levels is None or self._levels.device != self.up.device:
                self._levels = row_codes.levels(self.codes, self.bits, (self.vocab, self.rank))
            table = self.offset.float()[:, None] + self.scale.float()[:, None] * self._levels
        self._table = None if training else table
        return table

    def _load_from_state_dict(self, *args, **kwargs):
        self._table = self._levels = None
        super()._load_from_state_dict(*args, **kwargs)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.factor_a() @ self.up.float()).to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.factor_a()) @ self.up.float()
        return (rows * self.output_scale if self.output_scale != 1.0 else rows).to(self.compute_dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., V) = x E^T, through the rank-r bottleneck."""
        return (x @ self.up.to(x.dtype).t()) @ self.factor_a().to(x.dtype).t()

    def macs(self) -> int:  # as an lm_head: through the rank-r bottleneck
        return self.rank * (self.dim + self.vocab)

    def layout(self) -> dict[str, Any]:
        return {"vocab": self.vocab, "dim": self.dim, "rank": self.rank, "bits": self.bits}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "LowRankEmbedding":
        return cls(**layout)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        if min(layout["vocab"], layout["dim"], layout["rank"]) < 1:
            return "vocab, dim and rank must be at least 1"
        bits = layout.get("bits", 16)
        return None if 1 <= bits <= 8 or bits == 16 else f"bits = {bits} (1..8 or 16)"

    def misfit(self, original: nn.Module | None) -> str | None:
        return embedding_misfit(self, original)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, dim={self.dim}, rank={self.rank}, bits={self.bits}"
