"""One level of the KAN weight representation: W[i, j] ~ scale * KAN([a_i; b_j]).

a (d_out, c) are learned row codes, b (d_in, c) column codes, the KAN maps the 2c-vector of a
(row, column) pair to one value. Codes start from the top-c singular vectors of the target (scaled
into the spline grid), so the first level begins near a rank-c picture of the matrix; later levels
use finer spline grids on what is left (the coarse-to-fine fit lives in methods/kan/compressor.py).
Storage: the codes and the KAN's parameters, nothing per entry.

A field holds `copies` M independent fields of one shape (every tensor has a leading M), so the
matrices of one type across layers are fitted together; `select(m)` takes one out (M = 1).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .spline import KAN

CHUNK = 1 << 16  # (row, column) pairs evaluated per KAN call and copy


class KanField(nn.Module):
    def __init__(self, d_out: int, d_in: int, code_dim: int, hidden: int, grid: int, copies: int = 1):
        super().__init__()
        self.d_out, self.d_in, self.code_dim, self.hidden, self.grid = d_out, d_in, code_dim, hidden, grid
        self.rows = nn.Parameter(torch.zeros(copies, d_out, code_dim))
        self.cols = nn.Parameter(torch.zeros(copies, d_in, code_dim))
        self.kan = KAN([2 * code_dim, hidden, 1], grid=grid, copies=copies)
        self.scale = nn.Parameter(torch.ones(copies))

    @property
    def copies(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def init_codes(self, target: torch.Tensor) -> None:
        """target (M, d_out, d_in): codes from its top singular vectors, scaled into [-0.9, 0.9]."""
        c = self.code_dim
        u, s, vh = torch.linalg.svd(target.float(), full_matrices=False)
        root = s[:, :c].sqrt()
        rows, cols = u[..., :c] * root[:, None], vh[:, :c].transpose(1, 2) * root[:, None]
        pad = c - rows.shape[-1]
        rows, cols = torch.nn.functional.pad(rows, (0, pad)), torch.nn.functional.pad(cols, (0, pad))
        self.rows.copy_(0.9 * rows / rows.abs().amax((1, 2), keepdim=True).clamp_min(1e-12))
        self.cols.copy_(0.9 * cols / cols.abs().amax((1, 2), keepdim=True).clamp_min(1e-12))
        self.scale.copy_(target.float().std((1, 2)).clamp_min(1e-12))

    def values(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Entries W[m, i, j] for index vectors i, j (N,) shared by the copies -> (M, N)."""
        pairs = torch.cat([self.rows[:, i], self.cols[:, j]], -1)
        return self.scale[:, None] * self.kan(pairs)[..., 0]

    def forward(self) -> torch.Tensor:
        """The whole (M, d_out, d_in) matrices, evaluated in chunks of CHUNK pairs."""
        i = torch.arange(self.d_out, device=self.rows.device).repeat_interleave(self.d_in)
        j = torch.arange(self.d_in, device=self.rows.device).repeat(self.d_out)
        out = torch.cat([self.values(i[s:s + CHUNK], j[s:s + CHUNK]) for s in range(0, i.numel(), CHUNK)], 1)
        return out.reshape(self.copies, self.d_out, self.d_in)

    def select(self, m: int) -> "KanField":
        """Copy m as a field of its own (M = 1), same dtype and device."""
        one = KanField(self.d_out, self.d_in, self.code_dim, self.hidden, self.grid).to(self.rows)
        one.load_state_dict({k: v[m:m + 1] for k, v in self.state_dict().items()})
        return one


@torch.no_grad()
def evaluate(fields) -> torch.Tensor:
    """Sum of the levels' matrices (M, d_out, d_in), computed in float32 from the stored (float16)
    fields on the fields' device."""
    fields = [fields] if isinstance(fields, KanField) else list(fields)
    return sum(copy.deepcopy(f).float()() for f in fields)


def layout_of(field: KanField) -> dict[str, int]:
    return {"d_out": field.d_out, "d_in": field.d_in, "code_dim": field.code_dim, "hidden": field.hidden,
            "grid": field.grid}


def field_from_layout(layout: dict[str, int]) -> KanField:
    return KanField(layout["d_out"], layout["d_in"], layout["code_dim"], layout["hidden"], layout["grid"]).half()
