"""Per-layer rate-distortion: RTN, GPTQ and truncated SVD against the Gaussian bound (bounds.py).

Distortion is the relative output error on calibration inputs X (n, in) of the layer,
||(W - W') X^T||^2 / ||W X^T||^2 = tr(D C D^T) / tr(W C W^T) with D = W - W' and C = X^T X;
rate is the stored bits per weight of the layer's compressed form (codes, scales and zero points
as QuantLinear stores them; float16 factors for SVD).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..layers.quant_linear import QuantLinear, dequantize, fit_grid, quantize_to_grid
from ..methods.gptq_solver import gptq_solve
from ..linalg import truncated_svd
from ..layers.base import linear_weight
from .bounds import gaussian_distortion, gaussian_rate, source_spectrum

BITS = (2, 3, 4)
GROUP = 64
SVD_BITS = (1.0, 2.0, 4.0)  # factor budgets in bits per weight of the layer


@torch.no_grad()
def input_covariances(model: nn.Module, names: list[str], samples: torch.Tensor, batch_size: int = 2,
                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """{name: X^T X (in, in), float64} of each named linear's inputs over `samples` (N, T) token ids
    (the uncompressed model run once; layers that read the same input share nothing but the cost)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x.T @ x).cpu()
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        model.to(device)
        for chunk in samples.split(batch_size):
            model(input_ids=chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _relative_error(weight: torch.Tensor, estimate: torch.Tensor, cov: torch.Tensor) -> float:
    delta = (weight - estimate).double()
    w = weight.double()
    return float(torch.einsum("oi,ij,oj->", delta, cov, delta) / torch.einsum("oi,ij,oj->", w, cov, w))


def _quant_bits(codes, scale, zero, bits: int) -> float:
    layer = QuantLinear.from_codes(codes, scale, zero, None, bits, False, "int")
    stored = sum(b.numel() * b.element_size() * 8 for b in layer.buffers() if b is not None)
    return stored / (codes.shape[0] * codes.shape[1] * codes.shape[2])


def _spectrum(weight: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return source_spectrum(weight, cov / max(1.0, float(torch.diagonal(cov).mean())))


def layer_points(weight: torch.Tensor, cov: torch.Tensor, spectrum: torch.Tensor | None = None) -> list[dict]:
    """Every method's (bits per weight, relative output error) on one layer, each with the Gaussian
    bound's distortion at that rate and the rate the bound needs for that distortion (bits the
    method spends above the limit: `excess_bits`). weight (out, in), cov (in, in) = X^T X; `spectrum`:
    source_spectrum of the pair when already computed."""
    out_features, in_features = weight.shape
    group = GROUP if in_features % GROUP == 0 else in_features
    spectrum = _spectrum(weight, cov) if spectrum is None else spectrum
    points = []
    for bits in BITS:
        groups = weight.view(out_features, in_features // group, group)
        scale, zero = fit_grid(groups, bits, False, "int")
        codes = quantize_to_grid(groups, scale, zero, bits, "int")
        rtn = dequantize(codes, scale, zero, "int").reshape(weight.shape)
        points.append(("RTN", f"w{bits}g{group}", _quant_bits(codes, scale, zero, bits), rtn))
        codes, scale, zero = gptq_solve(weight, cov.float(), bits, group, act_order=True)
        gptq = dequantize(codes, scale, zero, "int").reshape(weight.shape)
        points.append(("GPTQ", f"w{bits}g{group}", _quant_bits(codes, scale, zero, bits), gptq))
    for budget in SVD_BITS:
        rank = max(1, math.floor(budget * out_features * in_features / (16 * (out_features + in_features))))
        if rank >= min(out_features, in_features):
            continue
        u, v = truncated_svd(weight, rank)
        points.append(("SVD", f"rank {rank}", 16 * rank * (out_features + in_features) / weight.numel(), u @ v))
    rows = []
    for method, setting, bits, estimate in points:
        error = _relative_error(weight, estimate, cov)
        bound_rate = gaussian_rate(spectrum, min(max(error, 1e-12), 1 - 1e-12), in_features)
        rows.append({"method": method, "setting": setting, "bits_per_weight": bits, "relative_error": error,
                     "bound_error": gaussian_distortion(spectrum, bits, in_features),
                     "bound_bits": bound_rate, "excess_bits": bits - bound_rate})
    return rows


def bound_curve(spectrum: torch.Tensor, dims: int, rates=(0.25, 0.5, 1, 1.5, 2, 3, 4, 5)) -> list[tuple]:
    """[(bits per weight, least relative output error)] of the Gaussian bound, for the figure."""
    return [(r, gaussian_distortion(spectrum, r, dims)) for r in rates]


def rate_distortion_report(model: nn.Module, names: list[str], samples: torch.Tensor, device: str = "cpu",
                           progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """{layer: {"points": layer_points rows, "bound": bound_curve}} for the named linears."""
    covs = input_covariances(model, names, samples, device=device)
    modules = dict(model.named_modules())
    report = {}
    for done, name in enumerate(names):
        weight = linear_weight(modules[name]).cpu()
        spectrum = _spectrum(weight, covs[name])
        report[name] = {"points": layer_points(weight, covs[name], spectrum),
                        "bound": bound_curve(spectrum, weight.shape[1])}
        if progress:
            progress(done + 1, len(names))
    return report
