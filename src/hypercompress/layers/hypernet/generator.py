"""The Solomonoff hypernetwork's generator: a small network whose output is the model's weights.

For L layers and T matrix types (q, k, v, o, gate, up, down for Llama):
    z[l, t]   (d_z)            learned layer-and-type embeddings (what is stored per matrix)
    h_l       (d_h)            backbone over depth: h = Backbone([z[l, 0..T-1]]_l), l = 0..L-1
    c[l, t]   (d_h)            context: tanh(W_c [h_l; z[l, t]]) + e_t (a learned type embedding)
    U[l, t]   (d_out, r)       row block i (rows iB..iB+B-1): head_U(gelu(c + P_row[i])) -> (B, r)
    V[l, t]   (r, d_in)        column block j:                 head_V(gelu(c + P_col[j])) -> (r, B)
    W[l, t] = g[l, t] * U V / sqrt(r)   (+ base[l, t] in residual mode)
With head=dit the U row blocks and V column blocks are instead sampled, as patch tokens, by a
diffusion transformer conditioned on c[l, t] (diffusion_head.py) from noise fixed by a seed.
P_row / P_col are coordinate embeddings of block positions, so the generator's size grows with
max(d) / B, not with d_out x d_in: large matrices are produced patch by patch. g is a learned
per-matrix gain. Every parameter here is stored in the artifact (counted in bpw): in float16, or with
value_bits 8 / 4 its matrices as per-row codes (row_codes.py) and the weights are generated from
exactly those decoded values.

Training at depth (two settings, neither stored; the weights are the same function of the stored
parameters either way):
- `tbptt` = k > 0: the backbone's state is detached every k layers (backbone.py; truncated
  backpropagation through time, Williams & Peng 1990).
- `install_lazy` instead of `install(forward())`: each GeneratedLinear makes its own W[l, t] inside
  its forward under torch.utils.checkpoint (gradient checkpointing, Chen et al. 2016, "Training Deep
  Nets with Sublinear Memory Cost"), so it is freed after use and made again in backward.
What dominates memory at depth is W, not the generator's activations: SmolLM2-135M's block holds
3.54 M weights (q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536), 14.2 MB in float32,
and the eager path keeps two such tensors per block until backward (W for F.linear's input gradient,
and U V for the gain's gradient): 3.4 GB at 120 layer-calls, against 0.65 MB of factors U, V per
block at rank 16 and d_h backbone floats. Lazy generation keeps one block linear's W at a time (at
most 3.5 MB, gate 1536 x 576) plus the (L, T, d_h) contexts; the backbone's own graph (ssm: a few
(d_h, 16) tensors per layer, about 40 kB at d_h 128) is what TBPTT shortens, so TBPTT is for the
gradient's reach and stability over 100+ layers rather than for memory.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...formats import row_codes
from ..base import StoredModule
from .backbone import make_backbone
from .diffusion_head import DiffusionHead

HEADS = ("mlp", "dit")


class HyperGenerator(StoredModule):
    """Generates the (d_out, d_in) weights of `shapes[t]` for every layer l < num_layers."""

    kind = "hypernet"

    def __init__(self, num_layers: int, shapes: list[list[int]], rank: int = 32, d_z: int = 32,
                 d_hidden: int = 256, block: int = 32, backbone: str = "gru", value_bits: int = 16,
                 head: str = "mlp", dit_depth: int = 2, dit_heads: int = 4, dit_steps: int = 4,
                 noise_seed: int = 0):
        super().__init__()
        self.value_bits, self.head = value_bits, head
        self.dit_depth, self.dit_heads, self.dit_steps, self.noise_seed = dit_depth, dit_heads, dit_steps, noise_seed
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
        if head == "dit":
            self.dit = DiffusionHead(d_hidden, block * rank, dit_depth, dit_heads, dit_steps)
        else:
            self.head_u = nn.Linear(d_hidden, block * rank)
            self.head_v = nn.Linear(d_hidden, rank * block)
        self._noise: dict[tuple[int, str], torch.Tensor] = {}  # (type, device) -> the DiT's x_1
        self.gain = nn.Parameter(torch.ones(num_layers, types))
        self.tbptt = 0  # training only: cut the backbone's gradient every tbptt layers (0: full depth)
        self._targets: list[nn.Module] = []  # the bound GeneratedLinears
        self.decompress_seconds: float | None = None
        self._codes: dict[str, dict[str, torch.Tensor]] = {}  # name -> row_codes.encode(...)
        if value_bits < 16:
            self.register_state_dict_post_hook(_save_codes)
            self.register_load_state_dict_pre_hook(_load_codes)

    def coded_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters stored as codes (none at value_bits 16)."""
        if self.value_bits >= 16:
            return {}
        return {n: p for n, p in self.named_parameters() if row_codes.is_coded(p)}

    @torch.no_grad()
    def quantize_values(self) -> None:
        """Round the coded parameters to their value_bits codes, in place (the stored values)."""
        for name, param in self.coded_parameters().items():
            self._codes[name] = row_codes.encode(param, self.value_bits)
            param.copy_(row_codes.decode(self._codes[name], self.value_bits, param.shape).to(param.dtype))

    def contexts(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """(L, T, d_h) contexts; `z` (L, T, d_z) replaces the stored embeddings (interpolation, noise)."""
        z = self.z if z is None else z
        states = self.backbone(z.reshape(self.num_layers, -1), tbptt=self.tbptt)  # (L, d_h)
        pair = torch.cat([states[:, None].expand(-1, z.shape[1], -1), z], -1)   # (L, T, d_h + d_z)
        return torch.tanh(self.context(pair)) + self.type_embedding

    def factors(self, context: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP head: context (..., d_h) -> U (..., d_out, r), V (..., r, d_in)."""
        d_out, d_in = shape
        rows, cols = -(-d_out // self.block), -(-d_in // self.block)
        u = self.head_u(F.gelu(context[..., None, :] + self.row_position[:rows]))   # (..., rows, B r)
        v = self.head_v(F.gelu(context[..., None, :] + self.col_position[:cols]))   # (..., cols, r B)
        return self.from_tokens(torch.cat([u, v], -2), shape)

    def from_tokens(self, tokens: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (..., rows + cols, B r) -> U (..., d_out, r), V (..., r, d_in)."""
        d_out, d_in = shape
        rows, cols = -(-d_out // self.block), -(-d_in // self.block)
        lead = tokens.shape[:-2]
        u = tokens[..., :rows, :].reshape(*lead, rows * self.block, self.rank)[..., :d_out, :]
        v = tokens[..., rows:, :].reshape(*lead, cols, self.rank, self.block).transpose(-2, -3)
        v = v.reshape(*lead, self.rank, cols * self.block)[..., :d_in]
        return u, v

    def to_tokens(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Inverse of from_tokens (zero padding): U (..., d_out, r), V (..., r, d_in) -> tokens."""
        d_out, d_in = u.shape[-2], v.shape[-1]
        rows, cols = -(-d_out // self.block), -(-d_in // self.block)
        lead = u.shape[:-2]
        u = F.pad(u, (0, 0, 0, rows * self.block - d_out)).reshape(*lead, rows, self.block * self.rank)
        v = F.pad(v, (0, cols * self.block - d_in)).reshape(*lead, self.rank, cols, self.block)
        return torch.cat([u, v.transpose(-2, -3).reshape(*lead, cols, self.rank * self.block)], -2)

    def coordinates(self, shape: list[int]) -> torch.Tensor:
        """DiT token coordinates (rows + cols, d_h): block position + which factor the token is."""
        rows, cols = -(-shape[0] // self.block), -(-shape[1] // self.block)
        return torch.cat([self.row_position[:rows] + self.dit.side[0], self.col_position[:cols] + self.dit.side[1]])

    def noise(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """The DiT's fixed starting noise for type t: (L, rows + cols, B r), from noise_seed."""
        key = (t, str(like.device))
        if key not in self._noise:
            shape = self.shapes[t]
            tokens = -(-shape[0] // self.block) - (-shape[1] // self.block)
            rng = torch.Generator().manual_seed(self.noise_seed * 1000 + t)
            self._noise[key] = torch.randn(self.num_layers, tokens, self.block * self.rank, generator=rng).to(like.device)
        return self._noise[key].to(like.dtype)

    def forward(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        """All weights: a list over types t of (L, d_out_t, d_in_t) tensors."""
        context = self.contexts(z)
        return [self.type_weights(context, t) for t in range(len(self.shapes))]

    def type_weights(self, context: torch.Tensor, t: int, layers: slice = slice(None)) -> torch.Tensor:
        """Weights of type t for the layers `layers` from contexts (L, T, d_h): (n, d_out_t, d_in_t)."""
        shape = self.shapes[t]
        if self.head == "dit":
            tokens = self.dit.sample(self.noise(t, context)[layers], context[layers, t], self.coordinates(shape))
            u, v = self.from_tokens(tokens, shape)
        else:
            u, v = self.factors(context[layers, t], shape)
        return self.gain[layers, t, None, None] * (u @ v) / math.sqrt(self.rank)

    def layer_weight(self, context: torch.Tensor, layer: int, t: int) -> torch.Tensor:
        """W[layer, t] (d_out_t, d_in_t) from contexts (L, T, d_h)."""
        return self.type_weights(context, t, slice(layer, layer + 1))[0]

    def denoising_loss(self, targets: list[torch.Tensor], rng: torch.Generator, z: torch.Tensor | None = None):
        """DiT warm start: the x0 denoising loss on target tokens [t] (L, rows + cols, B r)."""
        context = self.contexts(z)
        return sum(self.dit.loss(target, context[:, t], self.coordinates(self.shapes[t]), rng)
                   for t, target in enumerate(targets)) / len(targets)

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

    def install_lazy(self, z: torch.Tensor | None = None) -> None:
        """Training with the generator checkpointed: compute the contexts (L, T, d_h) now, with
        autograd through the backbone, and let every bound GeneratedLinear make its W[l, t] from them
        inside its own forward, under torch.utils.checkpoint (made again in backward; see the module
        docstring). The weights equal `forward()`'s up to float rounding of the per-layer matmuls."""
        context = self.contexts(z)
        for module in self._targets:
            module.set_generated(None, maker=functools.partial(self.layer_weight, context, module.layer, module.type))

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
                "value_bits": self.value_bits, "head": self.head, "dit_depth": self.dit_depth,
                "dit_heads": self.dit_heads, "dit_steps": self.dit_steps, "noise_seed": self.noise_seed}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "HyperGenerator":
        return cls(**layout).half()  # stored in float16 (methods/hypernet/method.py rounds it before saving)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        """Bounds that keep building the (meta) module cheap; real generators are far inside them."""
        shapes = layout["shapes"]
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            return "shapes must be a non-empty list of [out, in] pairs"
        limits = {"num_layers": 1 << 14, "rank": 1 << 12, "d_z": 1 << 14, "d_hidden": 1 << 14, "block": 1 << 12,
                  "dit_depth": 64, "dit_heads": 256, "dit_steps": 1 << 10, "value_bits": 16}
        for key, high in limits.items():
            if key in layout and not 1 <= layout[key] <= high:
                return f"{key} = {layout[key]} (1..{high})"
        return None


def _save_codes(module: HyperGenerator, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: coded parameters leave as codes + scale + offset (encoded now if the
    generator was never quantized, e.g. an empty one built to check an artifact's shapes)."""
    for name, param in module.coded_parameters().items():
        entry = module._codes.get(name) or (row_codes.meta_codes(param, module.value_bits) if param.is_meta
                                            else row_codes.encode(param, module.value_bits))
        del state[prefix + name]
        for suffix, key in zip(row_codes.SUFFIXES, ("codes", "scale", "offset")):
            state[prefix + name + suffix] = entry[key]


def _load_codes(module: HyperGenerator, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: codes -> the float16 parameter values (codes kept for saving)."""
    for name, param in module.coded_parameters().items():
        keys = [prefix + name + suffix for suffix in row_codes.SUFFIXES]
        if all(k in state for k in keys):
            entry = dict(zip(("codes", "scale", "offset"), (state.pop(k) for k in keys)))
            module._codes[name] = entry
            state[prefix + name] = row_codes.decode(entry, module.value_bits, param.shape)
