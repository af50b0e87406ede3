"""Permutation-invariant Set Transformer encoder of weight patches (Lee et al. 2019, "Set
Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks").

MAB(X, Y) = LN(H + rFF(H)), H = LN(X + Multihead(X, Y, Y))
ISAB_m(X) = MAB(X, MAB(I, X))     (m learned inducing points: O(n m) instead of O(n^2))
PMA_k(Z)  = MAB(S, rFF(Z))        (k learned seeds pool the set into k vectors)

Encoder: tokens (n, p*p) [+ tile-coordinate features] -> Linear -> ISAB x depth -> PMA_1 -> Linear
-> z (d_z). No positional order is used between tokens except what each token carries itself (its
tile coordinates), so permuting the tokens (with their coordinates) leaves z unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class MAB(nn.Module):
    """Multihead attention block: (B, n, d), (B, m, d) -> (B, n, d)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attention(x, y, y, need_weights=False)[0])
        return self.norm2(h + self.ff(h))


class ISAB(nn.Module):
    """Induced set attention block with `inducing` learned points: (B, n, d) -> (B, n, d)."""

    def __init__(self, dim: int, heads: int, inducing: int):
        super().__init__()
        self.points = nn.Parameter(torch.randn(1, inducing, dim) / dim ** 0.5)
        self.to_points, self.from_points = MAB(dim, heads), MAB(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.to_points(self.points.expand(x.shape[0], -1, -1), x)
        return self.from_points(x, h)


class PMA(nn.Module):
    """Pooling by multihead attention onto `seeds` learned vectors: (B, n, d) -> (B, seeds, d)."""

    def __init__(self, dim: int, heads: int, seeds: int = 1):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(1, seeds, dim) / dim ** 0.5)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.block = MAB(dim, heads)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block(self.seeds.expand(z.shape[0], -1, -1), self.ff(z))


class SetEncoder(nn.Module):
    """Weight patches of one layer -> its latent z.

    tokens (B, n, patch_dim) and coords (B, n, 2) (tile row / column, each scaled to [0, 1]) ->
    z (B, out_dim). Invariant to any permutation of the n (token, coord) pairs.
    """

    def __init__(self, patch_dim: int, out_dim: int, dim: int = 64, heads: int = 4,
                 inducing: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(patch_dim + 2, dim)
        self.blocks = nn.ModuleList(ISAB(dim, heads, inducing) for _ in range(depth))
        self.pool = PMA(dim, heads, 1)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.cat([tokens, coords.to(tokens.dtype)], -1))
        for block in self.blocks:
            h = block(h)
        return self.out(self.pool(h)[:, 0])
