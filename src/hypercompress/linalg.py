"""Linear algebra shared by stored kinds and methods (below both: layers/ never imports methods/)."""

from __future__ import annotations

import torch


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> U (out, rank), V (rank, in) float32 with U @ V the best rank-r fit in the
    Frobenius norm (Eckart-Young), computed in float64; the singular values are split evenly
    (U sqrt(s), sqrt(s) V^T) so that both factors stay in float16 range."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()
