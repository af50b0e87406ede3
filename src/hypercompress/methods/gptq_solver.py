"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), the Cholesky-based blocked solver, and a slow reference.

Notation (the paper's): W (d_row, d_col) a layer's weight, X (d_col, n) its calibration inputs,
H = 2 X X^T (d_col, d_col) the Hessian of the layer-wise objective ||W X - Q X||^2.
Columns are quantized one at a time; the error of column q is spread over the not-yet-quantized
columns F with the optimal update  delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{:,q}.
The fast solver reads every [H_F^-1] row it needs from the upper Cholesky factor of H^-1
(Lemma / eq. 4 of the paper) and applies updates lazily per block of columns.
"""

from __future__ import annotations

import torch

from ..layers.quant_linear import dequantize, fit_grid, quantize_to_grid
from .damping import add_damping, factorize_damped


def _prepare(W: torch.Tensor, H: torch.Tensor, act_order: bool):
    """Dead columns zeroed, optional descending-diag(H) permutation; float64 H (not yet dampened)."""
    W, H = W.clone().float(), H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    return W, H, perm


def inverse_cholesky(H: torch.Tensor, damp: float, layer: str = "layer") -> torch.Tensor:
    """The upper Cholesky factor of (H + damp mean(diag H) I)^-1, float32 (paper eq. 4); the
    damping is raised when H is singular (damping.factorize_damped), a UserError names `layer`
    when no damping helps."""
    def factorize(Hd: torch.Tensor) -> torch.Tensor:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)

    return factorize_damped(H, damp, factorize, layer).float()


def _grids(W: torch.Tensor, group: int, bits: int, symmetric: bool, zero_point: str):
    rows, cols = W.shape
    return fit_grid(W.reshape(rows, cols // group, group), bits, symmetric, zero_point)


def _sweep(W: torch.Tensor, U: torch.Tensor, block: int, column) -> torch.Tensor:
    """GPTQ's column sweep with lazy block updates, in place on W (rows, cols); U: the upper Cholesky
    factor of H^-1. column(col, i, W1) -> (codes, dequantized), each (rows, 1), of column `col` (the
    i-th of the block W1, updated so far). Returns the codes (rows, cols) in W's column order."""
    cols = W.shape[1]
    codes = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q, dequantized = column(i1 + i, i, W1)
            codes[:, i1 + i: i1 + i + 1] = q
            err = (W1[:, i: i + 1] - dequantized) / U1[i, i]
            W1[:, i:] -= err * U1[i: i + 1, i:]
            Err1[:, i: i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes


def gptq_solve(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, symmetric: bool = False,
               zero_point: str = "int", act_order: bool = False, damp: float = 0.01,
               block_size: int = 128, layer: str = "layer"):
    """Blocked GPTQ. W: (rows, cols), H: (cols, cols); group divides cols; `layer` names the layer in
    errors (a Hessian that no damping makes positive definite).

    Returns codes (rows, cols // group, group) as whole-number floats, scale and zero
    (rows, cols // group, 1), in the original column order. Grids: min-max per group, fitted on the
    updated weights when the solver reaches the group's first column; with act_order, fitted on W
    before any update ("static groups"), so that no column-to-group index needs storing.
    """
    rows, cols = W.shape
    zp = "float" if (not symmetric and zero_point == "float") else "int"
    static = act_order
    if static:
        scale, zero = _grids(W.float(), group, bits, symmetric, zero_point)
    else:
        scale = torch.zeros(rows, cols // group, 1, device=W.device)
        zero = torch.zeros_like(scale)
    W, H, perm = _prepare(W, H, act_order)
    U = inverse_cholesky(H, damp, layer)
    order = perm.tolist() if perm is not None else range(cols)  # read once: no device sync per column

    def column(col: int, i: int, W1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        orig = order[col]
        g = orig // group
        if not static and orig % group == 0:
            s, z = fit_grid(W1[:, i: i + group].unsqueeze(1), bits, symmetric, zero_point)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        q = quantize_to_grid(W1[:, i: i + 1], scale[:, g], zero[:, g], bits, zp)
        return q, dequantize(q, scale[:, g], zero[:, g], zp)

    # whole groups per block: grids fitted at a group's first column see the updated weights
    codes = _sweep(W, U, group * max(1, block_size // group), column)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.reshape(rows, cols // group, group), scale, zero


def gptq_solve_shared(parts: list[tuple[torch.Tensor, int, int]], H: torch.Tensor, symmetric: bool = False,
                      zero_point: str = "int", damp: float = 0.01, block_size: int = 128,
                      layer: str = "layer") -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Act-order GPTQ of several weights against one Hessian in one pass: what `gptq_solve` with
    act_order=True gives each part, up to float rounding.

    parts: [(W (rows_i, cols), bits_i, group_i)], every W with the same cols (H is (cols, cols)):
    linears fed one input (q/k/v, gate/up) and the options a planner tries for each. GPTQ solves
    every row on its own against the shared H and static grids (fitted on W before any update) do
    not depend on the updates, so the rows of all parts are stacked and solved together: one
    factorization of H and one pass over its columns instead of one per part. Returns
    [(codes (rows_i, cols // group_i, group_i), scale, zero (rows_i, cols // group_i, 1))]."""
    cols = H.shape[0]
    zp = "float" if (not symmetric and zero_point == "float") else "int"
    grids, col_scale, col_zero, maxq = [], [], [], []
    for W, bits, group in parts:
        scale, zero = _grids(W.float(), group, bits, symmetric, zero_point)
        grids.append((scale, zero))
        col_scale.append(scale.expand(-1, -1, group).reshape(W.shape[0], cols))
        col_zero.append(zero.expand(-1, -1, group).reshape(W.shape[0], cols))
        maxq.append(torch.full((W.shape[0], 1), float((1 << bits) - 1), device=W.device))
    W, H, perm = _prepare(torch.cat([p[0] for p in parts]), H, True)
    scales, zeros, maxq = torch.cat(col_scale)[:, perm], torch.cat(col_zero)[:, perm], torch.cat(maxq)
    U = inverse_cholesky(H, damp, layer)

    def column(col: int, i: int, W1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z, w = scales[:, col: col + 1], zeros[:, col: col + 1], W1[:, i: i + 1]
        q = torch.minimum(torch.round((w - z) / s if zp == "float" else w / s + z).clamp(min=0), maxq)
        return q, dequantize(q, s, z, zp)

    codes = _sweep(W, U, block_size, column)[:, torch.argsort(perm)]
    out, start = [], 0
    for (part, _bits, group), (scale, zero) in zip(parts, grids):
        rows = part.shape[0]
        out.append((codes[start: start + rows].reshape(rows, cols // group, group), scale, zero))
        start += rows
    return out


def gptq_reference(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, symmetric: bool = False,
                   zero_point: str = "int", act_order: bool = False, damp: float = 0.01):
    """The slow, obvious OBQ-order version: explicit H_F^-1, updated by removing one column at a
    time (paper eq. 2-3). Same outputs as `gptq_solve` up to float rounding."""
    rows, cols = W.shape
    zp = "float" if (not symmetric and zero_point == "float") else "int"
    if act_order:
        scale, zero = _grids(W.float(), group, bits, symmetric, zero_point)
    else:
        scale = torch.zeros(rows, cols // group, 1, dtype=torch.float64)
        zero = torch.zeros_like(scale)
    W, H, perm = _prepare(W, H, act_order)
    W = W.double()
    Hinv = torch.linalg.inv(add_damping(H, damp))
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    for col in range(cols):
        orig = int(perm[col]) if perm is not None else col
        g = orig // group
        if not act_order and orig % group == 0:
            s, z = fit_grid(W[:, col: col + group].float().unsqueeze(1), bits, symmetric, zero_point)
            scale[:, g], zero[:, g] = s[:, 0].double(), z[:, 0].double()
        w = W[:, col: col + 1]
        q = quantize_to_grid(w, scale[:, g], zero[:, g], bits, zp)
        codes[:, col] = q[:, 0]
        err = (w - dequantize(q, scale[:, g], zero[:, g], zp)) / Hinv[col, col]
        W -= err * Hinv[col: col + 1, :]
        Hinv -= Hinv[:, col: col + 1] @ Hinv[col: col + 1, :] / Hinv[col, col]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.reshape(rows, cols // group, group).float(), scale.float(), zero.float()
