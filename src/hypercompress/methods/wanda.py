"""Wanda (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for LLMs"):
prune by |W_ij| * ||X_j||_2 within each output row, no weight update."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..layers.sparse_linear import SparseLinear
from ..layers.base import linear_bias, linear_weight
from ..registry import register
from .base import LayerwiseMethod
from .sparsity import SparsityConfig, keep_mask


@register("wanda", SparsityConfig)
class Wanda(LayerwiseMethod):
    needs_calibration = True

    def __init__(self, config: SparsityConfig):
        super().__init__(config)
        self.sq_norm: dict[str, torch.Tensor] = {}

    def statistics(self) -> list[dict]:
        """Sum of squared inputs per column (float64) per layer."""
        return [self.sq_norm]

    def observe(self, name: str, x: torch.Tensor) -> None:
        sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()
        self.sq_norm[name] = self.sq_norm.get(name, 0) + sq

    def compress(self, name: str, layer: nn.Module) -> SparseLinear:
        weight = linear_weight(layer)
        score = weight.abs() * self.sq_norm.pop(name).sqrt().float()  # the paper, one line
        try:
            keep = keep_mask(score, self.config.sparsity, self.config.n_m())
        except ValueError as exc:
            raise UserError(f"{name}: {exc}; use another pattern") from None
        return SparseLinear.from_dense(weight.cpu(), keep.cpu(), linear_bias(layer))
