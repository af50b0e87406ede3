"""Round-to-nearest (RTN) weight quantization: the min-max grid of each group, nearest code.

The baseline every calibrated quantizer (GPTQ, AWQ...) is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import MethodConfig, check
from ..errors import UserError
from ..layers.quant_embedding import QuantEmbedding
from ..layers.quant_linear import QuantLinear, fit_grid, quantize_to_grid
from ..modules import linear_bias, linear_weight
from ..registry import register
from .base import LayerwiseMethod


@dataclass
class RtnConfig(MethodConfig):
    bits: int = 4               # bits per weight code, 2..8
    group_size: int = 64        # input columns sharing one scale; -1: one group per row
    symmetric: bool = False     # symmetric grid around 0 (no zero point stored)
    zero_point: str = "int"     # asymmetric zero: 'int' (b-bit integer) or 'float' (float16 minimum)

    def validate(self) -> None:
        check(2 <= self.bits <= 8, f"bits={self.bits}: must be between 2 and 8")
        check(self.group_size == -1 or self.group_size > 0,
              f"group_size={self.group_size}: must be positive, or -1 for one group per row")
        check(self.zero_point in ("int", "float"),
              f"zero_point={self.zero_point!r}: must be 'int' or 'float'")


def resolve_group_size(name: str, in_features: int, group_size: int) -> int:
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        divisors = [d for d in (32, 64, 96, 128, 192, 256) if in_features % d == 0]
        raise UserError(
            f"{name}: group_size {group} does not divide in_features {in_features}; "
            f"use one that does ({', '.join(map(str, divisors)) or 'e.g. -1'}) or -1 for whole rows"
        )
    return group


@register("rtn", RtnConfig)
class RTN(LayerwiseMethod):
    """Linear layers become QuantLinear; an Embedding (vocab, dim) becomes QuantEmbedding, grouped
    along dim (and a tied lm_head then reads it: see modules.replace_module)."""

    def compress(self, name: str, layer: nn.Module) -> QuantLinear:
        c = self.config
        weight = linear_weight(layer)
        out_features, in_features = weight.shape
        group = resolve_group_size(name, in_features, c.group_size)
        groups = weight.view(out_features, in_features // group, group)
        scale, zero = fit_grid(groups, c.bits, c.symmetric, c.zero_point)
        zero_point = "float" if (not c.symmetric and c.zero_point == "float") else "int"
        codes = quantize_to_grid(groups, scale, zero, c.bits, zero_point)
        if isinstance(layer, nn.Embedding):
            table = QuantEmbedding.from_codes(codes, scale, zero, None, c.bits, c.symmetric,
                                              c.zero_point)
            table.compute_dtype = layer.weight.dtype
            return table
        return QuantLinear.from_codes(codes, scale, zero, linear_bias(layer), c.bits, c.symmetric,
                                      c.zero_point)
