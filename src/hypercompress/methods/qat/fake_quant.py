"""The training form of a quantized weight: latent float32 weights seen through their grid.

A QuantLinear (or QuantEmbedding) stores codes q in [0, 2^b), a float16 scale s per group and a zero
point z per group (layers/quant_linear.py). FakeQuantLinear keeps instead the latent weight W
(out, in) float32 and trainable scales, and computes with
    W_hat = (clamp(round(W / s) + z, 0, 2^b - 1) - z) * s        (integer zero, or symmetric)
    W_hat = clamp(round((W - m) / s), 0, 2^b - 1) * s + m         (float zero m, trained too)
per group of `group_size` input columns. Rounding passes gradients straight through (STE, Bengio et
al. 2013), so W learns which way to round and s receives LSQ's step-size gradient (round(v) - v
inside the grid, the clamp bound outside; Esser et al. 2020); s and m are seen rounded to float16
(straight through), the values that will be stored. `to_stored()` writes the same codes, scales and
zeros back as an ordinary QuantLinear / QuantEmbedding, so every exporter and kernel applies:
its logits equal the trained model's up to float rounding. Training-time only: never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.quant_embedding import QuantEmbedding
from ...layers.quant_linear import SCALE_DTYPE, QuantLinear, fit_grid
from ...layers.base import linear_bias, linear_weight


def _straight_through(value: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """`forward`'s values with `value`'s gradient."""
    return value + (forward - value).detach()


class FakeQuantLinear(nn.Module):
    """Latent weight (out, in) float32 + scales (out, groups) [+ float zeros] as parameters;
    integer / symmetric zeros (out, groups) a fixed buffer. `embedding`: forward looks up rows."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool, zero_point: str, bias: torch.Tensor | None, embedding: bool = False):
        super().__init__()
        self.bits, self.group_size, self.symmetric, self.embedding = bits, group_size, symmetric, embedding
        self.zero_point = "float" if (not symmetric and zero_point == "float") else "int"
        self.stored_zero_point = zero_point  # the QuantLinear layout's own value
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.scales = nn.Parameter(scale.detach().float().reshape(weight.shape[0], -1).clone())
        zero = zero.detach().float().expand(weight.shape[0], self.scales.shape[1]).clone()
        if self.zero_point == "float":
            self.zeros = nn.Parameter(zero)
        else:
            self.register_buffer("zeros", zero)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # the top code 2^b - 1 as a tensor, not a Python int: a compiled block (training/engine.py)
        # then serves modules of any bit width with one graph instead of recompiling per width
        self.register_buffer("top_code", torch.tensor(float((1 << bits) - 1)), persistent=False)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_dense(cls, layer: nn.Module, bits: int, group_size: int, symmetric: bool = False,
                   zero_point: str = "int") -> "FakeQuantLinear":
        """RTN's starting point: the min-max grid of each group (group_size -1: whole rows)."""
        weight = linear_weight(layer).detach().float()
        out_features, in_features = weight.shape
        group = in_features if group_size == -1 else group_size
        scale, zero = fit_grid(weight.view(out_features, in_features // group, group), bits, symmetric, zero_point)
        return cls(weight, scale[..., 0], zero[..., 0], bits, group, symmetric, zero_point,
                   None if isinstance(layer, nn.Embedding) else linear_bias(layer),
                   embedding=isinstance(layer, nn.Embedding))

    @classmethod
    def from_stored(cls, module: QuantLinear) -> "FakeQuantLinear":
        """Start from what an earlier stage stored (GPTQ's codes): W = its dequantized weight."""
        zero = module._zero(torch.float32)
        zero = zero.expand(module.out_features, module.scales.shape[1], 1)[..., 0] if zero.dim() else \
            torch.full(module.scales.shape, float(zero))
        return cls(module.dense_weight(torch.float32), module.scales.float(), zero, module.bits, module.group_size,
                   module.symmetric, module.zero_point, module.bias, embedding=isinstance(module, QuantEmbedding))

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) as stored (float16-rounded, straight through), each (out, groups, 1)."""
        scale = self.scales.abs().clamp_min(1e-8)
        scale = _straight_through(scale, scale.to(SCALE_DTYPE).float().clamp_min(1e-8))
        zero = self.zeros
        if self.zero_point == "float":
            zero = _straight_through(zero, zero.to(SCALE_DTYPE).float())
        return scale[..., None], zero[..., None]

    def quantized_weight(self) -> torch.Tensor:
        """W_hat (out, in) float32, differentiable in W, s (and m)."""
        groups = self.weight.view(self.out_features, -1, self.group_size)
        scale, zero = self._grid()
        top, bottom = self.top_code, self.top_code.new_zeros(())  # tensor bounds: no graph break, no sync
        if self.zero_point == "float":
            level = _straight_through((groups - zero) / scale, torch.round((groups - zero) / scale))
            return (torch.clamp(level, bottom, top) * scale + zero).reshape_as(self.weight)
        level = _straight_through(groups / scale + zero, torch.round(groups / scale + zero))
        return ((torch.clamp(level, bottom, top) - zero) * scale).reshape_as(self.weight)

    def logit_matrix(self) -> torch.Tensor | None:
        """W_hat as an output layer's (V, D) matrix (training/distill.py's chunked KL), or None with a bias."""
        return None if self.embedding or self.bias is not None else self.quantized_weight()

    output_scale = 1.0  # an embedding's rows x this (Gemma's scaled embedding: modules.carry_embedding_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        if self.embedding:
            rows = F.embedding(x, weight)
            return rows * self.output_scale if self.output_scale != 1.0 else rows
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_stored(self) -> QuantLinear:
        """The trained codes, scales and zeros as the stored kind (QuantEmbedding for an embedding)."""
        maxq = (1 << self.bits) - 1
        scale, zero = (t.detach() for t in self._grid())
        groups = self.weight.detach().view(self.out_features, -1, self.group_size)
        if self.zero_point == "float":
            codes = torch.round((groups - zero) / scale).clamp(0, maxq)
        else:
            codes = torch.round(groups / scale + zero).clamp(0, maxq)
        kind = QuantEmbedding if self.embedding else QuantLinear
        return kind.from_codes(codes, scale, zero, self.bias, self.bits, self.symmetric, self.stored_zero_point)


class FakeTiedHead(nn.Module):
    """The lm_head of a tied model while its embedding trains: logits = x W_hat^T with the
    embedding's own W_hat (one latent table, as the stored TiedHead shares one stored table)."""

    def __init__(self, source: FakeQuantLinear):
        super().__init__()
        self._source = [source]  # a list keeps it out of this module's parameters

    def logit_matrix(self) -> torch.Tensor:
        """The embedding's W_hat (V, D), differentiable in its latent weights and scales."""
        return self._source[0].quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._source[0].quantized_weight().to(x.dtype))
