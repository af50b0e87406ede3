"""Round-to-nearest (RTN) weight quantization: the min-max grid of each group, nearest code.

The baseline every calibrated quantizer (GPTQ, AWQ...) is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import MethodConfig, check
from ..layers.quant_embedding import QuantEmbedding
from ..layers.quant_linear import QuantLinear, fit_grid, quantize_to_grid, resolve_group_size
from ..layers.base import linear_bias, linear_weight
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
        smallest = smallest_useful_group(self.bits, self.symmetric, self.zero_point)
        check(self.group_size == -1 or self.group_size >= smallest,
              f"group_size={self.group_size}: with bits={self.bits} each group's float16 scale"
              f"{'' if self.symmetric else ' and zero point'} make the weights cost as much as float16 "
              f"or more; use group_size >= {smallest}, or -1 for one group per row")


def smallest_useful_group(bits: int, symmetric: bool, zero_point: str) -> int:
    """The smallest group size whose storage stays under float16's 16 bits per weight: a group of g
    weights stores g codes of `bits`, a float16 scale and (asymmetric) a zero point of `bits`
    ('int') or 16 ('float') bits, i.e. bits + overhead / g per weight (QuantLinear's layout)."""
    overhead = 16 + (0 if symmetric else bits if zero_point == "int" else 16)
    return overhead // (16 - bits) + 1


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
