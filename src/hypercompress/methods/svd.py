"""Truncated SVD: W (out, in) ~ U_r diag(s_r) V_r^T, stored as two float16 factors.

Eckart-Young: the rank-r truncation minimises ||W - W_r||_F. The singular values are split evenly
(U sqrt(s), sqrt(s) V^T) so that both factors stay in float16 range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig, check
from ..errors import UserError
from ..layers.low_rank import LowRankLinear
from ..linalg import truncated_svd
from ..layers.base import linear_bias, linear_weight
from ..registry import register
from .base import LayerwiseMethod


@dataclass
class SvdConfig(MethodConfig):
    keep: float = 0.5           # fraction of each layer's parameters the two factors may hold
    rank: int | None = None     # fixed rank for every layer; when set, `keep` is not used

    def validate(self) -> None:
        check(0 < self.keep < 1, f"keep={self.keep}: must be in (0, 1)")
        check(self.rank is None or self.rank >= 1, f"rank={self.rank}: must be >= 1")


def rank_for(out_features: int, in_features: int, config: SvdConfig) -> int:
    """Rank r with r * (out + in) <= keep * out * in, at least 1, at most min(out, in)."""
    if config.rank is not None:
        return min(config.rank, out_features, in_features)
    budget = config.keep * out_features * in_features / (out_features + in_features)
    return max(1, min(int(budget), out_features, in_features))


def max_useful_rank(out_features: int, in_features: int) -> int:
    """The largest rank r whose float16 factors U (out, r), V (r, in) hold fewer weights than the
    float16 matrix: r (out + in) < out in (the break-even rank is the first r past it)."""
    return (out_features * in_features - 1) // (out_features + in_features)


def check_rank(method: str, config: SvdConfig, modules: dict[str, nn.Module]) -> None:
    """Refuse a fixed rank at or past the break-even rank of any selected layer (UserError naming
    the most restrictive layer and the largest useful rank)."""
    if config.rank is None or not modules:
        return
    shapes = {n: tuple(linear_weight(m).shape) for n, m in modules.items()}
    name = min(shapes, key=lambda n: (max_useful_rank(*shapes[n]), n))
    limit, (out_f, in_f) = max_useful_rank(*shapes[name]), shapes[name]
    if limit < 1:
        raise UserError(f"{method}: {name} ({out_f}x{in_f}) is too small for factors of any rank to store "
                        "less than the matrix; add it to the stage's ignore patterns")
    check(config.rank <= limit,
          f"{method}: rank={config.rank} is at or past the break-even rank of {name} ({out_f}x{in_f}), "
          f"where the factors U, V store more than the dense matrix; the largest useful rank of the "
          f"selected layers is {limit}: set rank to 1..{limit} (or use keep)")


@register("svd", SvdConfig)
class SVD(LayerwiseMethod):
    def check_modules(self, modules: dict[str, nn.Module]) -> None:
        check_rank("svd", self.config, modules)

    def compress(self, name: str, layer: nn.Module) -> LowRankLinear:
        weight = linear_weight(layer)
        U, V = truncated_svd(weight, rank_for(*weight.shape, self.config))
        return LowRankLinear.from_factors(U, V, linear_bias(layer))
