"""Lossless patch tokenization of 2-D weights: (rows, cols) <-> (num_patches, p * p) tokens.

The matrix is zero-padded to multiples of the patch size p, cut into p x p tiles in row-major tile
order, and each tile flattened row-major. The padding is recorded in `PatchGrid`, so `from_patches`
returns exactly the original tensor (same values, shape and dtype). Each token also gets its tile
coordinates (row block, column block), which encoders use as position features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchGrid:
    rows: int
    cols: int
    patch: int

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // self.patch)

    @property
    def col_blocks(self) -> int:
        return -(-self.cols // self.patch)

    @property
    def padding(self) -> tuple[int, int]:
        """Zero rows and columns appended before tiling."""
        return self.row_blocks * self.patch - self.rows, self.col_blocks * self.patch - self.cols


def to_patches(weight: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor, PatchGrid]:
    """weight (rows, cols) -> tokens (R * C, patch * patch), coords (R * C, 2) long, grid."""
    if weight.dim() != 2 or patch <= 0:
        raise ValueError(f"to_patches needs a 2-D weight and a positive patch size, got {tuple(weight.shape)}, {patch}")
    grid = PatchGrid(weight.shape[0], weight.shape[1], patch)
    pad_rows, pad_cols = grid.padding
    padded = F.pad(weight, (0, pad_cols, 0, pad_rows))
    tiles = padded.reshape(grid.row_blocks, patch, grid.col_blocks, patch).permute(0, 2, 1, 3)
    tokens = tiles.reshape(grid.row_blocks * grid.col_blocks, patch * patch)
    r, c = torch.meshgrid(torch.arange(grid.row_blocks), torch.arange(grid.col_blocks), indexing="ij")
    return tokens, torch.stack([r.reshape(-1), c.reshape(-1)], 1), grid


def from_patches(tokens: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Inverse of to_patches: tokens (R * C, patch * patch) -> weight (rows, cols), padding dropped."""
    p = grid.patch
    tiles = tokens.reshape(grid.row_blocks, grid.col_blocks, p, p).permute(0, 2, 1, 3)
    return tiles.reshape(grid.row_blocks * p, grid.col_blocks * p)[: grid.rows, : grid.cols]
