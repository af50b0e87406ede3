"""A coordinate-aware diffusion transformer head (DiT, Peebles & Xie 2023) over weight-factor patches.

The alternative to the MLP head (head=dit). For one matrix (d_out, d_in) with factors U (d_out, r)
and V (r, d_in), the patches are the tokens: row block i of U (B rows: B*r values) and column block
j of V (B columns: r*B values), S = ceil(d_out / B) + ceil(d_in / B) tokens of size B*r.
    token embedding   e_s = W_in x_s + P_coord[s] + side[U or V]      (P_coord: the generator's
                                                                       row / column block positions)
    condition         c = context[l, t] (backbone state) + TimeMLP(sinusoid(t))
    DiT blocks        adaLN-Zero: shift/scale/gate from c around self-attention and an MLP
    output            x0_hat = W_out(modulate(LN(e), c))              (predicts the clean patches)
Noise schedule: cosine (Nichol & Dhariwal 2021), abar(t) = cos(pi/2 * t)^2 on t in [0, 1].
Training: the x0-prediction denoising loss on patches of target factors (warm start), then the
K-step deterministic DDIM sampler (eta = 0, Song et al. 2021) is differentiated end to end by the
distillation. Decompression runs the same K steps from noise drawn from a stored seed, so the
weights are a deterministic function of the stored parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def abar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: signal fraction at time t in [0, 1] (1 at t=0), kept away from 0."""
    return torch.cos(t.clamp(0, 1) * math.pi / 2).pow(2).clamp(1e-4, 1.0)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t (N,) -> (N, dim) sinusoidal embedding of 1000 t."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """x (N, S, d), c (N, d) -> x: adaLN-Zero self-attention and MLP (Peebles & Xie 2023, fig. 3)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.modulation = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, -1)
        n, s, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).reshape(n, s, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate1[:, None] * self.proj(attended.transpose(1, 2).reshape(n, s, d))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiffusionHead(nn.Module):
    """Denoiser and sampler of patch tokens (N, S, token) given conditions (N, d) and coordinates (S, d)."""

    def __init__(self, d: int, token: int, depth: int = 2, heads: int = 4, steps: int = 4):
        super().__init__()
        self.steps = steps
        self.embed_in = nn.Linear(token, d)
        self.side = nn.Parameter(torch.zeros(2, d))   # U-row tokens vs V-column tokens
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.final_modulation = nn.Linear(d, 2 * d)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.embed_out = nn.Linear(d, token)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """x_t (N, S, token), t (N,), cond (N, d), coords (S, d) -> predicted clean tokens (N, S, token)."""
        c = cond + self.time(sinusoid(t, cond.shape[-1]))
        h = self.embed_in(x_t) + coords
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, -1)
        return self.embed_out(modulate(self.norm(h), shift, scale))

    def sample(self, noise: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM from x_1 = noise (N, S, token) in `steps` uniform steps -> x_0."""
        x = noise
        times = torch.linspace(1.0, 0.0, self.steps + 1, device=noise.device)
        for now, nxt in zip(times[:-1], times[1:]):
            a_now, a_next = abar(now), abar(nxt)
            x0 = self.denoise(x, now.expand(x.shape[0]), cond, coords)
            eps = (x - a_now.sqrt() * x0) / (1 - a_now).sqrt()
            x = x0 if nxt == 0 else a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """x0-prediction denoising loss at one random time per sample (MSE, x0 of unit scale)."""
        t = torch.rand(x0.shape[0], generator=rng).to(x0.device)
        noise = torch.randn(x0.shape, generator=rng).to(x0.device)
        a = abar(t)[:, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return (self.denoise(x_t, t, cond, coords) - x0).pow(2).mean()
