"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"): OBS pruning with GPTQ's lazy blocked updates, optionally joint with quantization.

W (rows, cols), H = 2 X X^T (cols, cols). Per block of columns an adaptive mask is chosen by the OBS
saliency w^2 / [H^-1]_cc^2 (unstructured: the block's lowest `sparsity` fraction; N:M: per row,
the M - N lowest of every M columns, chosen when the solver reaches them). Each column is then
pruned (or quantized when kept, in joint mode), and its error spread over the later columns with
the rows of the upper Cholesky factor of H^-1, exactly as in GPTQ.
"""

from __future__ import annotations

import torch

from ..layers.quant_linear import dequantize, fit_grid, quantize_to_grid
from .gptq_solver import _prepare, inverse_cholesky


def sparsegpt_solve(W: torch.Tensor, H: torch.Tensor, sparsity: float,
                    n_m: tuple[int, int] | None = None, bits: int = 16, group: int = 0,
                    symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                    layer: str = "layer"):
    """Returns (weight (rows, cols) float32 with pruned entries 0, keep mask (rows, cols) bool,
    codes (rows, cols // group, group) or None, scale, zero (rows, cols // group, 1) or None).
    A singular H is dampened more (gptq_solver.inverse_cholesky); `layer` names it in errors."""
    rows, cols = W.shape
    quantize = bits < 16
    W, H, _ = _prepare(W, H, act_order=False)
    U = inverse_cholesky(H, damp, layer)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    codes = torch.zeros(rows, cols, device=W.device) if quantize else None
    scale = torch.zeros(rows, cols // group, 1, device=W.device) if quantize else None
    zero = torch.zeros_like(scale) if quantize else None
    if n_m is not None:
        block_size = max(n_m[1], block_size - block_size % n_m[1])
    block = group * max(1, block_size // group) if quantize else block_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(U1)[None, :]
        if n_m is None:
            saliency = W1 ** 2 / d ** 2
            pruned = int(saliency.numel() * sparsity)
            order = torch.sort(saliency.flatten(), stable=True).indices[:pruned]
            block_keep = torch.ones(saliency.shape, dtype=torch.bool, device=W.device)
            block_keep.view(-1)[order] = False
            keep[:, i1:i2] = block_keep
        for i in range(i2 - i1):
            col = i1 + i
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                saliency = W1[:, i: i + m] ** 2 / d[:, i: i + m] ** 2
                low = torch.sort(saliency, dim=1, stable=True).indices[:, : m - n]
                keep[:, col: col + m].scatter_(1, low, False)
            w = W1[:, i: i + 1]
            q = w * keep[:, col: col + 1]
            if quantize:
                g = col // group
                if col % group == 0:
                    s, z = fit_grid(W1[:, i: i + group].unsqueeze(1), bits, symmetric, "int")
                    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                c = quantize_to_grid(q, scale[:, g], zero[:, g], bits, "int")
                codes[:, col] = c[:, 0]
                q = dequantize(c, scale[:, g], zero[:, g], "int") * keep[:, col: col + 1]
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err * U1[i: i + 1, i:]
            W1[:, i: i + 1] = q
            Err1[:, i: i + 1] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if quantize:
        codes = codes.reshape(rows, cols // group, group)
    return W, keep, codes, scale, zero
