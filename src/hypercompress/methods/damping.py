"""Dampened factorizations of a layer's Hessian, retried with more damping when it is singular.

GPTQ (Frantar et al. 2022, section 4, "Cholesky reformulation") adds lambda = damp * mean(diag H)
to the diagonal of H = 2 X X^T / n before factorizing it; SparseGPT and the SVD-LLM whitening do the
same. With fewer calibration tokens than input features H has rank < in_features, and a small damp
may still leave it numerically indefinite: the Cholesky factorization then fails. `factorize_damped`
retries with ten times the damping (up to mean(diag H) itself), logs the damping that worked, and
otherwise raises a one-line UserError naming the layer and the fix.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from ..errors import UserError

log = logging.getLogger("hypercompress")
T = TypeVar("T")
# the config check of every Hessian solver's damp (gptq, sparsegpt, asvd, kv_lowrank)
DAMP_RANGE = ("damp={}: must be in (0, 1), e.g. 0.01 (this fraction of mean(diag H) is added to its "
              "diagonal; 0 leaves a Hessian from few calibration tokens singular)")


def add_damping(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I (a new tensor)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H + damp * H.diagonal().mean() * eye


def damping_ladder(damp: float) -> list[float]:
    """damp, 10 damp, 100 damp, ... below 1, then 1: the dampings tried in turn (a library caller's
    damp 0 goes on from 1e-4)."""
    ladder = []
    while damp < 0.99:
        ladder.append(damp)
        damp = damp * 10 if damp > 0 else 1e-4
    return ladder + [1.0]


def factorize_damped(H: torch.Tensor, damp: float, factorize: Callable[[torch.Tensor], T],
                     layer: str) -> T:
    """factorize(H + d * mean(diag H) * I) for the first d of damping_ladder(damp) where it succeeds
    (no torch.linalg.LinAlgError, finite result). Raises UserError naming `layer` when none does
    (H not finite, or zero)."""
    if not bool(torch.isfinite(H).all()):
        raise UserError(f"{layer}: its calibration inputs hold inf or nan; check the model's weights "
                        "and calibrate in float32")
    for d in damping_ladder(damp):
        try:
            result = factorize(add_damping(H, d))
        except torch.linalg.LinAlgError:
            continue
        if all(bool(torch.isfinite(t).all()) for t in (result if isinstance(result, tuple) else (result,))):
            if d != damp:
                log.warning("%s: Hessian singular with damp %g (too few calibration tokens?); "
                            "solved with damp %g", layer, damp, d)
            return result
    raise UserError(f"{layer}: the Hessian of its calibration inputs stays singular even with damp 1; "
                    "pass more calibration tokens (--calib-samples, --calib-len)")
