"""The Solomonoff hypernetwork's generator: a small network whose output is the model's weights.

For L layers and T matrix types (q, k, v, o, gate, up, down for Llama):
    z[l, t]   (d_z)            learned layer-and-type embeddings (what is stored per matrix)
    h_l       (d_h)            backbone over depth: h = Backbone([z[l, 0..T-1]]_l), l = 0..L-1
    c[l, t]   (d_h)            context: tanh(W_c [h_l; z[l, t]]) + e_t (a learned type embedding)
    U[l, t]   (d_out, r)       row block i (rows iB..iB+B-1): head_U(gelu(c + P_row[i])) -> (B, r)
    V[l, t]   (r, d_in)        column block j:                 head_V(gelu(c + P_col[j])) -> (r, B)
    W[l, t] = g[l, t] * U V / sqrt(r)   (+ base[l, t] in residual mode)
P_row / P_col are coordinate embeddings of block positions, so the generator's size grows with
max(d) / B, not with d_out x d_in: large matrices are produced patch by patch. g is a learned
per-matrix gain. Every parameter here is stored in the artifact (counted in bpw): in float16, or with
value_bits 8 / 4 its matrices as per-row codes (value_codes.py) and the weights are generated from
exactly those decoded values.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...modules import StoredModule
from . import value_codes
from .backbone import make_backbone


class HyperGenerator(StoredModule):
    """Generates the (d_out, d_in) weights of `shapes[t]` for every layer l < num_layers."""

    kind = "hypernet"

    def __init__(self, num_layers: int, shapes: list[list[int]], rank: int = 32, d_z: int = 32,
                 d_hidden: int = 256, block: int = 32, backbone: str = "gru", value_bits: int = 16):
        super().__init__()
        self.value_bits = value_bits
        self.num_layers, self.shapes, self.rank = num_layers, [list(s) for s in shapes], rank
        self.d_z, self.d_hidden, self.block, self.backbone_kind = d_z, d_hidden, block, backbone
        types = len(shapes)
        self.z = nn.Parameter(torch.randn(num_layers, types, d_z) / math.sqrt(d_z))
        self.backbone = make_backbone(backbone, types * d_z, d_hidden)
        self.context = nn.Linear(d_hidden + d_z, d_hidden)
        self.type_embedding = nn.Parameter(torch.zeros(types, d_hidden))
        max_blocks = max(-(-d // block) for s in shapes for d in s)
        self.row_position = nn.Parameter(torch.randn(max_blocks, d_hidden) * 0.1)
        self.col_position = nn.Parameter(torch.randn(max_blocks, d_hidden) * 0.1)
        self.head_u = nn.Linear(d_hidden, block * rank)
        self.head_v = nn.Linear(d_hidden, rank * block)
        self.gain = nn.Parameter(torch.ones(num_layers, types))
        self._targets: list[nn.Module] = []  # the bound GeneratedLinears
        self.decompress_seconds: float | None = None
        self._codes: dict[str, dict[str, torch.Tensor]] = {}  # name -> value_codes.encode(...)
        if value_bits < 16:
            self.register_state_dict_post_hook(_save_codes)
            self.register_load_state_dict_pre_hook(_load_codes)

    def coded_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters stored as codes (none at value_bits 16)."""
        if self.value_bits >= 16:
            return {}
        return {n: p for n, p in self.named_parameters() if value_codes.is_coded(p)}

    @torch.no_grad()
    def quantize_values(self) -> None:
        """Round the coded parameters to their value_bits codes, in place (the stored values)."""
        for name, param in self.coded_parameters().items():
            self._codes[name] = value_codes.encode(param, self.value_bits)
            param.copy_(value_codes.decode(self._codes[name], self.value_bits, param.shape).to(param.dtype))

    def contexts(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """(L, T, d_h) contexts; `z` (L, T, d_z) replaces the stored embeddings (interpolation, noise)."""
        z = self.z if z is None else z
        states = self.backbone(z.reshape(self.num_layers, -1))                  # (L, d_h)
        pair = torch.cat([states[:, None].expand(-1, z.shape[1], -1), z], -1)   # (L, T, d_h + d_z)
        return torch.tanh(self.context(pair)) + self.type_embedding

    def factors(self, context: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """context (..., d_h) -> U (..., d_out, r), V (..., r, d_in)."""
        d_out, d_in = shape
        rows, cols = -(-d_out // self.block), -(-d_in // self.block)
        u = self.head_u(F.gelu(context[..., None, :] + self.row_position[:rows]))   # (..., rows, B r)
        u = u.reshape(*context.shape[:-1], rows * self.block, self.rank)[..., :d_out, :]
        v = self.head_v(F.gelu(context[..., None, :] + self.col_position[:cols]))   # (..., cols, r B)
        v = v.reshape(*context.shape[:-1], cols, self.rank, self.block).transpose(-2, -3)
        v = v.reshape(*context.shape[:-1], self.rank, cols * self.block)[..., :d_in]
        return u, v

    def forward(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        """All weights: a list over types t of (L, d_out_t, d_in_t) tensors."""
        context = self.contexts(z)
        out = []
        for t, shape in enumerate(self.shapes):
            u, v = self.factors(context[:, t], shape)
            out.append(self.gain[:, t, None, None] * (u @ v) / math.sqrt(self.rank))
        return out

    def bind(self, model: nn.Module) -> None:
        """Called by artifact.load after every module is in place: regenerate all weights once."""
        from .linear import GeneratedLinear

        self._targets = [m for m in model.modules() if isinstance(m, GeneratedLinear)]
        tick = time.perf_counter()
        self.materialize()
        self.decompress_seconds = time.perf_counter() - tick

    def install(self, weights: list[torch.Tensor]) -> None:
        """Give every bound GeneratedLinear its weight from `weights` (this module's output)."""
        for module in self._targets:
            module.set_generated(weights[module.type][module.layer])

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the generated weights into the bound GeneratedLinears (no autograd graph kept)."""
        stored = self.z.dtype  # float16 in an artifact; computed in float32 (fp16 -> fp32 -> fp16 is exact)
        weights = self.float()()
        self.to(stored)
        self.install(weights)

    def layout(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "shapes": self.shapes, "rank": self.rank, "d_z": self.d_z,
                "d_hidden": self.d_hidden, "block": self.block, "backbone": self.backbone_kind,
                "value_bits": self.value_bits}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "HyperGenerator":
        return cls(**layout)


def _save_codes(module: HyperGenerator, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: coded parameters leave as codes + scale + offset (encoded now if the
    generator was never quantized, e.g. an empty one built to check an artifact's shapes)."""
    for name, param in module.coded_parameters().items():
        entry = module._codes.get(name) or value_codes.encode(param, module.value_bits)
        del state[prefix + name]
        for suffix, key in zip(value_codes.SUFFIXES, ("codes", "scale", "offset")):
            state[prefix + name + suffix] = entry[key]


def _load_codes(module: HyperGenerator, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: codes -> the float16 parameter values (codes kept for saving)."""
    for name, param in module.coded_parameters().items():
        keys = [prefix + name + suffix for suffix in value_codes.SUFFIXES]
        if all(k in state for k in keys):
            entry = dict(zip(("codes", "scale", "offset"), (state.pop(k) for k in keys)))
            module._codes[name] = entry
            state[prefix + name] = value_codes.decode(entry, module.value_bits, param.shape)
