"""B-spline Kolmogorov-Arnold network layers (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks").

A KAN layer maps x (N, d_in) -> y (N, d_out) with a learnable univariate function on every edge:
    y_j = sum_i [ w_base[j, i] * silu(x_i) + sum_k c[j, i, k] * B_k(x_i) ]
`copies` M independent networks of the same shape run side by side (parameters (M, ...), inputs
(M, N, d_in)), so many matrices are fitted at once with one kernel launch per operation.
B_k are the order-k B-spline bases on a uniform grid of `grid` intervals over [-1, 1], extended by
k knots on each side (Cox-de Boor recursion). Written here (about 40 lines) rather than taken from
pykan, whose layers carry symbolic-regression machinery and per-layer state this use does not need,
and efficient-kan, which is not published as a package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bspline_basis(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """x (N, d) in any range, knots (G + 2k + 1,) increasing -> bases (N, d, G + k) (Cox-de Boor)."""
    x = x[..., None]
    bases = ((x >= knots[:-1]) & (x < knots[1:])).to(x.dtype)
    for p in range(1, order + 1):
        left = (x - knots[: -(p + 1)]) / (knots[p:-1] - knots[: -(p + 1)]) * bases[..., :-1]
        right = (knots[p + 1:] - x) / (knots[p + 1:] - knots[1:-p]) * bases[..., 1:]
        bases = left + right
    return bases


class KANLayer(nn.Module):
    """(M, N, d_in) -> (M, N, d_out): a SiLU base path plus B-spline edge functions, M copies."""

    def __init__(self, d_in: int, d_out: int, grid: int = 5, order: int = 3, copies: int = 1):
        super().__init__()
        self.d_in, self.d_out, self.grid, self.order = d_in, d_out, grid, order
        step = 2.0 / grid
        knots = torch.arange(-order, grid + order + 1, dtype=torch.float32) * step - 1.0
        self.register_buffer("knots", knots, persistent=False)  # a function of (grid, order): not stored
        self.base = nn.Parameter(torch.randn(copies, d_out, d_in) / d_in ** 0.5)
        self.coef = nn.Parameter(torch.randn(copies, d_out, d_in, grid + order) * 0.1 / d_in ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies, n = x.shape[:2]
        bases = bspline_basis(x, self.knots.to(x.dtype), self.order)       # (M, N, d_in, G + k)
        spline = bases.reshape(copies, n, -1) @ self.coef.reshape(copies, self.d_out, -1).transpose(1, 2)
        return F.silu(x) @ self.base.transpose(1, 2) + spline


class KAN(nn.Module):
    """A stack of KAN layers: dims [d_0, d_1, ..., d_n]; tanh keeps hidden values inside the grid."""

    def __init__(self, dims: list[int], grid: int = 5, order: int = 3, copies: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(KANLayer(a, b, grid, order, copies) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.tanh(x))
        return x
