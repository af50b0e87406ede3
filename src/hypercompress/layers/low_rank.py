"""LowRankLinear: a linear layer stored as two factors, W ~ U V.

U: (out_features, rank), V: (rank, in_features), both float16; the forward pass computes
y = (x V^T) U^T + b, never forming W, so memory and compute shrink with the rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import CompressedModule

FACTOR_DTYPE = torch.float16


class LowRankLinear(CompressedModule):
    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("U", torch.zeros(out_features, rank, dtype=FACTOR_DTYPE))
        self.register_buffer("V", torch.zeros(rank, in_features, dtype=FACTOR_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=FACTOR_DTYPE) if bias else None)

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None):
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None)
        layer.U.copy_(U.to(FACTOR_DTYPE))
        layer.V.copy_(V.to(FACTOR_DTYPE))
        if bias is not None:
            layer.bias.copy_(bias.to(FACTOR_DTYPE))
        return layer

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.U.to(dtype) @ self.V.to(dtype)

    def prepare_fast(self, dtype: torch.dtype, workload: str = "decode") -> str:
        """Two GEMMs with the factors cast once; one dense GEMM when that multiplies less."""
        from ..kernels.paths import DenseLinear, LowRankPath

        if self.rank * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            self._fast = DenseLinear(self.dense_weight(torch.float32), self.bias, dtype)
            self._fast.backend = "one GEMM (factors merged: r (in + out) >= in x out)"
        else:
            self._fast = LowRankPath(self.U, self.V, self.bias, dtype)
        return self._fast.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_or_none(x)
        if fast is not None:
            return fast(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.V.to(x.dtype)), self.U.to(x.dtype), bias)

    def macs(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def layout(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "LowRankLinear":
        return cls(**layout)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        return None if min(layout["in_features"], layout["out_features"], layout["rank"]) >= 1 else \
            "in_features, out_features and rank must be at least 1"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
