"""The Shannon rate-distortion bound of a Gaussian source with a layer's own spectrum.

A weight matrix W (out, in) is read as `out` samples of a vector in R^in. Under squared error on
the layer's outputs for inputs of covariance C (in, in), the error of an estimate W' is
||(W - W') C^{1/2}||_F^2, the squared error of the rows of A = W C^{1/2}; with C = I it is the
weights' own squared error. A Gaussian vector source whose covariance has the eigenvalues
lambda_i = sigma_i(A)^2 / out needs, at mean squared error D per vector (reverse water-filling;
Cover & Thomas, Elements of Information Theory, 2nd ed., theorem 10.3.3),

    R(D) = sum_i max(0, 1/2 log2(lambda_i / theta))  bits per vector,  D = sum_i min(theta, lambda_i),

theta the water level. Here D is relative, D / sum_i lambda_i (the relative output error
||(W - W') C^{1/2}||^2 / ||W C^{1/2}||^2), and R is per weight, R / in. Of all sources with that
covariance the Gaussian needs the most bits (Cover & Thomas, theorem 10.3.3 and problem 10.8), so
the bound is what an ideal vector quantizer reaches on a Gaussian model of the layer; real
weights, being non-Gaussian, could need fewer.
"""

from __future__ import annotations

import math

import torch


def source_spectrum(weight: torch.Tensor, input_covariance: torch.Tensor | None = None) -> torch.Tensor:
    """lambda_i (descending, float64): the eigenvalues of the row covariance of W C^{1/2}.

    weight: (out, in); input_covariance: (in, in) symmetric positive semi-definite, e.g. X^T X / n
    of calibration inputs X (n, in), or None for the weights' own squared error. The covariance is
    factored as C = L L^T after a 1e-6 relative damping (X^T X is often singular)."""
    w = weight.detach().double()
    if input_covariance is not None:
        c = input_covariance.detach().double()
        damp = 1e-6 * float(torch.diagonal(c).mean().clamp_min(1e-30))
        factor = torch.linalg.cholesky(c + damp * torch.eye(c.shape[0], dtype=c.dtype))
        w = w @ factor
    sigma = torch.linalg.svdvals(w)
    return (sigma ** 2 / w.shape[0]).sort(descending=True).values


def water_level(spectrum: torch.Tensor, relative_distortion: float) -> float:
    """theta with sum_i min(theta, lambda_i) = relative_distortion x sum_i lambda_i (bisection on
    the log scale; 0 < relative_distortion < 1)."""
    if not 0 < relative_distortion < 1:
        raise ValueError(f"relative distortion {relative_distortion} must lie in (0, 1)")
    lam = spectrum[spectrum > 0]
    goal = relative_distortion * float(lam.sum())
    low, high = 0.0, float(lam.max())
    for _ in range(200):
        theta = (low + high) / 2
        if float(torch.clamp(lam, max=theta).sum()) < goal:
            low = theta
        else:
            high = theta
        if high - low <= 1e-15 * high:
            break
    return (low + high) / 2


def gaussian_rate(spectrum: torch.Tensor, relative_distortion: float, dims: int) -> float:
    """Bits per weight that a Gaussian source of `spectrum` needs at `relative_distortion`
    (reverse water-filling; `dims` = in_features, the coefficients per vector)."""
    theta = water_level(spectrum, relative_distortion)
    lam = spectrum[spectrum > theta]
    return float((0.5 * torch.log2(lam / theta)).sum()) / dims


def gaussian_distortion(spectrum: torch.Tensor, bits_per_weight: float, dims: int) -> float:
    """The inverse: the least relative distortion at `bits_per_weight` (bisection on D)."""
    if bits_per_weight <= 0:
        return 1.0
    low, high = 1e-12, 1 - 1e-12  # rate falls as D grows
    for _ in range(100):
        mid = math.sqrt(low * high)
        if gaussian_rate(spectrum, mid, dims) > bits_per_weight:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-9:
            break
    return math.sqrt(low * high)
