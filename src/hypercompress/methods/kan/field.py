"""One level of the KAN weight representation: W[i, j] ~ scale * KAN([a_i; b_j]).

a (d_out, c) are learned row codes, b (d_in, c) column codes, the KAN maps the 2c-vector of a
(row, column) pair to one value. Codes start from the top-c singular vectors of the target (scaled
into the spline grid), so the first level begins near a rank-c picture of the matrix; later levels
use finer spline grids on what is left (the coarse-to-fine hierarchy lives in compressor.py).
Storage: the codes and the KAN's parameters, nothing per entry.
"""

from __future__ import annotations

import torch
from torch import nn

from .spline import KAN

CHUNK = 1 << 16  # (row, column) pairs evaluated per KAN call


class KanField(nn.Module):
    def __init__(self, d_out: int, d_in: int, code_dim: int, hidden: int, grid: int):
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.rows = nn.Parameter(torch.zeros(d_out, code_dim))
        self.cols = nn.Parameter(torch.zeros(d_in, code_dim))
        self.kan = KAN([2 * code_dim, hidden, 1], grid=grid)
        self.scale = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def init_codes(self, target: torch.Tensor) -> None:
        """Row/column codes from the target's top singular vectors, scaled into [-0.9, 0.9]."""
        c = self.rows.shape[1]
        u, s, vh = torch.linalg.svd(target.float(), full_matrices=False)
        rows, cols = u[:, :c] * s[:c].sqrt(), vh[:c].t() * s[:c].sqrt()
        pad = c - rows.shape[1]
        rows, cols = torch.nn.functional.pad(rows, (0, pad)), torch.nn.functional.pad(cols, (0, pad))
        self.rows.copy_(0.9 * rows / rows.abs().amax().clamp_min(1e-12))
        self.cols.copy_(0.9 * cols / cols.abs().amax().clamp_min(1e-12))
        self.scale.copy_(target.float().std().clamp_min(1e-12))

    def values(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Entries W[i, j] for index vectors i, j (N,) -> (N,)."""
        pairs = torch.cat([self.rows[i], self.cols[j]], -1)
        return self.scale * self.kan(pairs)[:, 0]

    def forward(self) -> torch.Tensor:
        """The whole (d_out, d_in) matrix, evaluated in chunks of CHUNK pairs."""
        i = torch.arange(self.d_out, device=self.rows.device).repeat_interleave(self.d_in)
        j = torch.arange(self.d_in, device=self.rows.device).repeat(self.d_out)
        out = torch.cat([self.values(i[s:s + CHUNK], j[s:s + CHUNK]) for s in range(0, i.numel(), CHUNK)])
        return out.reshape(self.d_out, self.d_in)
