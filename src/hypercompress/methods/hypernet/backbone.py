"""Recurrent backbones over depth: a hidden state carried from layer l to layer l+1.

Input (L, d_in) (one vector per layer, in depth order) -> states (L, d_hidden).
- "gru": torch.nn.GRU (Cho et al. 2014).
- "ssm": a selective state-space recurrence (Mamba's S6, Gu & Dao 2023) in plain PyTorch:
      delta_t = softplus(W_delta x_t)              (d_inner,)   input-dependent step
      B_t = W_B x_t, C_t = W_C x_t                 (n_state,)   input-dependent in/out maps
      h_t = exp(delta_t * A) * h_{t-1} + (delta_t * B_t) x_t     h: (d_inner, n_state), A < 0 diagonal
      y_t = C_t h_t + D * x_t,  out_t = W_out (y_t * silu(z_t))
  L is the number of layers (tens), so a plain loop is exact and cheap.
- "mamba": the `mamba-ssm` CUDA kernels (optional; an error names the package when missing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError

BACKBONES = ("gru", "ssm", "mamba")


class SelectiveSSM(nn.Module):
    """(L, d_in) -> (L, d_hidden); see the module docstring for the recurrence."""

    def __init__(self, d_in: int, d_hidden: int, n_state: int = 16):
        super().__init__()
        self.inner = nn.Linear(d_in, 2 * d_hidden)          # x_t and the gate z_t
        self.delta = nn.Linear(d_hidden, d_hidden)
        self.bc = nn.Linear(d_hidden, 2 * n_state, bias=False)
        self.log_a = nn.Parameter(torch.log(torch.arange(1, n_state + 1).float()).repeat(d_hidden, 1))
        self.skip = nn.Parameter(torch.ones(d_hidden))
        self.out = nn.Linear(d_hidden, d_hidden)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, gate = self.inner(inputs).chunk(2, -1)
        delta = F.softplus(self.delta(x))                     # (L, d)
        b, c = self.bc(x).chunk(2, -1)                        # (L, n) each
        a = -torch.exp(self.log_a)                            # (d, n)
        h = x.new_zeros(a.shape)
        ys = []
        for t in range(x.shape[0]):
            h = torch.exp(delta[t, :, None] * a) * h + (delta[t, :, None] * b[t]) * x[t, :, None]
            ys.append(h @ c[t] + self.skip * x[t])
        return self.out(torch.stack(ys) * F.silu(gate))


class GruBackbone(nn.Module):
    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.gru = nn.GRU(d_in, d_hidden, batch_first=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.gru(inputs[None])[0][0]


class MambaBackbone(nn.Module):
    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        try:
            from mamba_ssm import Mamba
        except ImportError:
            raise UserError("backbone=mamba needs the optional package mamba-ssm (CUDA): "
                            "pip install mamba-ssm, or use backbone=ssm (plain PyTorch)") from None
        self.inner = nn.Linear(d_in, d_hidden)
        self.mamba = Mamba(d_model=d_hidden)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mamba(self.inner(inputs)[None])[0]


def make_backbone(kind: str, d_in: int, d_hidden: int) -> nn.Module:
    if kind == "gru":
        return GruBackbone(d_in, d_hidden)
    if kind == "ssm":
        return SelectiveSSM(d_in, d_hidden)
    if kind == "mamba":
        return MambaBackbone(d_in, d_hidden)
    raise UserError(f"backbone={kind!r}: must be one of {', '.join(BACKBONES)}; fix it in the recipe or --set")
