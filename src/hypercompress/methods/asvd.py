"""Activation-aware low-rank factorization: SVD of the weight seen through its inputs.

Plain SVD minimises ||W - W'||_F, blind to which input directions matter. Here the factorization
minimises the layer's output error on calibration inputs X (in, n), ||W X - W' X||_F, by truncating
the SVD of W S for a transform S built from X, then mapping back with S^-1:
  - whitening='cholesky' (SVD-LLM, Wang et al. 2024): S = the Cholesky factor of X X^T, so that
    ||(W - W') X||_F^2 equals the sum of the truncated squared singular values of W S exactly
    ("truncation-aware data whitening");
  - whitening='scale' (ASVD, Yuan et al. 2023): S = diag(mean_j |x_ij|)^alpha, a per-channel scaling.
W S = U Sigma V^T,  W' = [U_r Sigma_r^(1/2)] [Sigma_r^(1/2) V_r^T S^-1]  (U: (out, r), V: (r, in)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import check
from ..layers.low_rank import LowRankLinear
from ..layers.base import linear_bias, linear_weight
from ..registry import register
from .damping import DAMP_RANGE, factorize_damped
from .gptq import HessianMethod
from .svd import SvdConfig, check_rank, rank_for


@dataclass
class AsvdConfig(SvdConfig):
    whitening: str = "cholesky"   # 'cholesky' (SVD-LLM) or 'scale' (ASVD)
    alpha: float = 0.5            # exponent of the ASVD scaling
    damp: float = 0.01            # added to diag(X X^T) (fraction of its mean) before Cholesky

    def validate(self) -> None:
        super().validate()
        check(self.whitening in ("cholesky", "scale"),
              f"whitening={self.whitening!r}: must be 'cholesky' or 'scale'")
        check(0 < self.alpha <= 2, f"alpha={self.alpha}: must be in (0, 2]")
        check(0 < self.damp < 1, DAMP_RANGE.format(self.damp))


def cholesky_whitening(H: torch.Tensor, damp: float,
                       layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """H (in, in) = X^T X / n -> (S, S^-1), S the lower Cholesky factor of H + damp * mean(diag H) I;
    a singular H is dampened more (damping.factorize_damped), a UserError names `layer` otherwise."""
    def factorize(Hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = torch.linalg.cholesky(Hd)
        eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        return S, torch.linalg.solve_triangular(S, eye, upper=False)

    return factorize_damped(H, damp, factorize, layer)


def whitened_factors(W: torch.Tensor, S: torch.Tensor, S_inv: torch.Tensor, rank: int):
    """W (out, in), S and S^-1 (in, in) -> U (out, r), V (r, in) with U V = best rank-r W' in the
    metric ||(W - W') S||_F."""
    u, s, vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), ((root[:, None] * vh[:rank]) @ S_inv).float()


@register("asvd", AsvdConfig)
class ActivationAwareSVD(HessianMethod):
    gram_dtype = torch.float64  # the whitening's Cholesky factor needs the small eigenvalues right

    def __init__(self, config: AsvdConfig):
        super().__init__(config)
        self.abs_sum: dict[str, torch.Tensor] = {}

    def check_modules(self, modules: dict[str, nn.Module]) -> None:
        check_rank("asvd", self.config, modules)

    def statistics(self) -> list[dict]:
        return [*super().statistics(), self.abs_sum]

    def observe(self, name: str, x: torch.Tensor) -> None:
        super().observe(name, x)
        flat = x.reshape(-1, x.shape[-1]).double().abs()
        self.abs_sum[name] = self.abs_sum.get(name, 0) + flat.sum(0)

    def compress(self, name: str, layer: nn.Module) -> LowRankLinear:
        c = self.config
        count = self._counts[name]
        H = self.hessian(name)  # 2 X X^T / n
        abs_mean = self.abs_sum.pop(name) / count
        W = linear_weight(layer)
        if c.whitening == "cholesky":
            S, S_inv = cholesky_whitening(H, c.damp, name)
        else:
            scale = abs_mean.clamp(min=1e-6) ** c.alpha
            S, S_inv = torch.diag(scale), torch.diag(1 / scale)
        U, V = whitened_factors(W, S, S_inv, rank_for(*W.shape, c))
        return LowRankLinear.from_factors(U.cpu(), V.cpu(), linear_bias(layer))
