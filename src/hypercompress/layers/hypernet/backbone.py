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

Truncated backpropagation through depth (TBPTT, Williams & Peng 1990, "An efficient gradient-based
algorithm for on-line training of recurrent network trajectories"): `forward(inputs, tbptt=k)`
carries the state from layer to layer exactly as with k = 0, so the outputs are the same, but
detaches it on entering layers k, 2k, ...: the gradient of output l reaches inputs and states of
layers floor(l / k) * k .. l only. k = 0 (or k >= L) is full backpropagation through depth. mamba
refuses k > 0: its fused selective scan runs the whole sequence in one kernel, with no state
between layers to cut (backbone=ssm is the same recurrence in plain PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError

BACKBONES = ("gru", "ssm", "mamba")
TBPTT_MAMBA = ("tbptt needs a backbone whose state can be cut between layers; mamba-ssm's fused scan has none: "
               "use backbone=ssm (the same selective recurrence in PyTorch) or tbptt=0")


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

    def forward(self, inputs: torch.Tensor, tbptt: int = 0) -> torch.Tensor:
        x, gate = self.inner(inputs).chunk(2, -1)
        delta = F.softplus(self.delta(x))                     # (L, d)
        b, c = self.bc(x).chunk(2, -1)                        # (L, n) each
        a = -torch.exp(self.log_a)                            # (d, n)
        h = x.new_zeros(a.shape)
        ys = []
        for t in range(x.shape[0]):
            if tbptt and t and t % tbptt == 0:
                h = h.detach()  # TBPTT: the state is carried, its gradient cut
            h = torch.exp(delta[t, :, None] * a) * h + (delta[t, :, None] * b[t]) * x[t, :, None]
            ys.append(h @ c[t] + self.skip * x[t])
        return self.out(torch.stack(ys) * F.silu(gate))


class GruBackbone(nn.Module):
    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.gru = nn.GRU(d_in, d_hidden, batch_first=True)

    def forward(self, inputs: torch.Tensor, tbptt: int = 0) -> torch.Tensor:
        if not tbptt or tbptt >= inputs.shape[0]:
            return self.gru(inputs[None])[0][0]
        outputs, state = [], None
        for start in range(0, inputs.shape[0], tbptt):  # chunks of tbptt layers, the state carried detached
            out, state = self.gru(inputs[None, start:start + tbptt], state)
            outputs.append(out[0])
            state = state.detach()
        return torch.cat(outputs)


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

    def forward(self, inputs: torch.Tensor, tbptt: int = 0) -> torch.Tensor:
        if tbptt and tbptt < inputs.shape[0]:
            raise UserError(TBPTT_MAMBA)
        return self.mamba(self.inner(inputs)[None])[0]


def make_backbone(kind: str, d_in: int, d_hidden: int) -> nn.Module:
    if kind == "gru":
        return GruBackbone(d_in, d_hidden)
    if kind == "ssm":
        return SelectiveSSM(d_in, d_hidden)
    if kind == "mamba":
        return MambaBackbone(d_in, d_hidden)
    raise UserError(f"backbone={kind!r}: must be one of {', '.join(BACKBONES)}; fix it in the recipe or --set")
