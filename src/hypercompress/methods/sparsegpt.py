"""SparseGPT pruning (Frantar & Alistarh 2023), unstructured or N:M, optionally joint with
quantization of the kept weights, behind the layer-wise calibration runner."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import check
from ..errors import UserError
from ..layers.quant_linear import resolve_group_size
from ..layers.sparse_linear import SparseLinear
from ..layers.base import linear_bias, linear_weight
from ..registry import register
from .damping import DAMP_RANGE
from .gptq import HessianMethod
from .sparsegpt_solver import sparsegpt_solve
from .sparsity import SparsityConfig


@dataclass
class SparseGptConfig(SparsityConfig):
    bits: int = 16              # 16: kept weights stay float16; 2..8: quantized jointly
    group_size: int = 64        # quantization group (joint mode); -1: one group per row
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128

    def validate(self) -> None:
        super().validate()
        check(self.bits == 16 or 2 <= self.bits <= 8, f"bits={self.bits}: must be 16 or 2..8")
        check(self.group_size == -1 or self.group_size > 0,
              f"group_size={self.group_size}: must be positive, or -1 for one group per row")
        check(0 < self.damp < 1, DAMP_RANGE.format(self.damp))
        check(self.block_size > 0, f"block_size={self.block_size}: must be positive")


@register("sparsegpt", SparseGptConfig)
class SparseGPT(HessianMethod):
    def compress(self, name: str, layer: nn.Module) -> SparseLinear:
        c = self.config
        weight = linear_weight(layer)
        n_m = c.n_m()
        if n_m is not None and weight.shape[1] % n_m[1]:
            raise UserError(f"{name}: in_features {weight.shape[1]} is not a multiple of M={n_m[1]}; choose a pattern whose M divides it or add the layer to ignore")
        group = resolve_group_size(name, weight.shape[1], c.group_size) if c.bits < 16 else 0
        W, keep, codes, scale, zero = sparsegpt_solve(weight, self.hessian(name), c.sparsity, n_m,
                                                      c.bits, group, c.symmetric, c.damp, c.block_size,
                                                      layer=name)
        bias = linear_bias(layer)
        if codes is None:
            return SparseLinear.from_dense(W.cpu(), keep.cpu(), bias)
        return SparseLinear.from_codes(codes.cpu(), keep.cpu(), scale.cpu(), zero.cpu(), bias,
                                       c.bits, c.symmetric)
