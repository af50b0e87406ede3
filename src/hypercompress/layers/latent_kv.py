"""Joint low-rank key/value projections with a latent KV cache.

k_proj and v_proj read the same input x (D,); stacked, [W_k; W_v] (2 n_kv d, D) ~ [B_k; B_v] A with a
shared down-projection A (r, D): one latent c = A x (r values per token) from which every key and
value head is expanded (B_k c, B_v c), as in the low-rank KV-cache projections of Palu (Chang et al.
2024) and the latent attention of DeepSeek-V2 (2024). Stored: A and B_k in `LatentKV` (replacing
k_proj), B_v in `LatentValue` (replacing v_proj, reading A through its `source`), float16.

Bound to a model (`bind`), the attention module caches the latent instead of keys and values: the
cache holds (c, position) per token, r + 1 values instead of 2 n_kv d; keys are re-expanded and
rotated (RoPE at the stored positions) at every step. Works with the dynamic (default) cache.
Without a cache the forward equals the dense one with the factored weights.
"""

from __future__ import annotations

import inspect
import itertools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedModule

FACTOR_DTYPE = torch.float16


class LatentKV(CompressedModule):
    """k_proj as B_k (A x) + b_k; also the shared latent A x."""

    kind = "latent_kv"
    own_path = "latent: keys from the shared r-value latent (cache stays latent)"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("A", torch.zeros(rank, in_features, dtype=FACTOR_DTYPE))
        self.register_buffer("B", torch.zeros(out_features, rank, dtype=FACTOR_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=FACTOR_DTYPE) if bias else None)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., r)."""
        return F.linear(x, self.A.to(x.dtype))

    def expand(self, c: torch.Tensor) -> torch.Tensor:
        """(..., r) -> (..., out)."""
        return F.linear(c, self.B.to(c.dtype), None if self.bias is None else self.bias.to(c.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.latent(x))

    def macs(self) -> int:  # the shared latent, then the keys from it
        return self.rank * (self.in_features + self.out_features)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.B.to(dtype) @ self.A.to(dtype)

    def layout(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "LatentKV":
        return cls(**layout)

    def bind(self, model: nn.Module) -> None:
        """Make the parent attention cache the latent (see latent_attention_forward)."""
        name = next(n for n, m in model.named_modules() if m is self)
        attention = model.get_submodule(name.rpartition(".")[0])
        rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
        attention._rotary = [rotary]  # a list: not registered as a child of the attention
        attention.forward = types.MethodType(latent_attention_forward, attention)


class LatentValue(CompressedModule):
    """v_proj as B_v (A x) + b_v, A read from the LatentKV named `source`."""

    kind = "latent_kv_value"
    own_path = "latent: values from the shared r-value latent (cache stays latent)"

    def __init__(self, source: str, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.source, self.in_features, self.out_features, self.rank = source, in_features, out_features, rank
        self.register_buffer("B", torch.zeros(out_features, rank, dtype=FACTOR_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=FACTOR_DTYPE) if bias else None)
        self._source: list[LatentKV] = []  # a list, so the source is not registered twice

    def expand(self, c: torch.Tensor) -> torch.Tensor:
        return F.linear(c, self.B.to(c.dtype), None if self.bias is None else self.bias.to(c.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self._source[0].latent(x))

    def macs(self) -> int:  # the values from the latent the keys' module computed
        return self.rank * self.out_features

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.B.to(dtype) @ self._source[0].A.to(dtype)

    def bind(self, model: nn.Module) -> None:
        source = model.get_submodule(self.source)
        if not isinstance(source, LatentKV) or source.rank != self.rank or source.in_features != self.in_features:
            raise ValueError(f"latent source {self.source} is not a LatentKV of rank {self.rank}")
        self._source[:] = [source]

    def layout(self) -> dict[str, Any]:
        return {"source": self.source, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "LatentValue":
        return cls(**layout)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def latent_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                             cache=None, position_ids: torch.Tensor | None = None, **kwargs):
    """Llama-family attention whose cache holds the latent c = A x and each token's position:
    q as usual; keys and values expanded from every cached latent, keys rotated at their positions;
    per-head q/k norms (the arch table's head_norms, Qwen3's q_norm / k_norm) applied to each head
    before RoPE, as the model's own attention does.
    hidden_states (b, s, D) -> (attention output (b, s, D), attention weights or None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q_norm, k_norm, whole = _head_norms(self)
    batch, length = hidden_states.shape[:2]
    d = self.head_dim

    def heads(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # (b, s, n d) -> (b, n, s, d), normed
        x = norm(x) if whole else x
        x = x.view(x.shape[0], x.shape[1], -1, d)
        return (x if whole else norm(x)).transpose(1, 2)

    query = heads(self.q_proj(hidden_states), q_norm)
    cos, sin = position_embeddings
    query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
    latent = self.k_proj.latent(hidden_states)                                   # (b, s, r)
    if position_ids is None:
        start = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        position_ids = torch.arange(start, start + length, device=hidden_states.device)[None].expand(batch, -1)
    positions = position_ids.to(torch.float32)[:, None, :, None]                 # (b, 1, s, 1), exact
    latent = latent[:, None]                                                     # (b, 1, s, r)
    if cache is not None:
        latent, positions = cache.update(latent, positions, self.layer_idx, kwargs=kwargs)
    latent, every = latent[:, 0], positions[:, 0, :, 0].round().long()           # (b, S, r), (b, S)
    total = latent.shape[1]
    key = heads(self.k_proj.expand(latent), k_norm)                              # (b, n_kv, S, d)
    value = heads(self.v_proj.expand(latent), nn.Identity())
    cos_all, sin_all = self._rotary[0](latent, every)
    key = key * cos_all.unsqueeze(1) + _rotate_half(key) * sin_all.unsqueeze(1)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attend(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(output.reshape(batch, length, -1).contiguous()), weights


def _head_norms(attention: nn.Module) -> tuple[Any, Any, bool]:
    """(q norm, k norm, whether they span all heads) of an attention module: the q/k norms the arch
    table names (ArchSpec.head_norms, relative to a block: "self_attn.q_norm", "self_attn.k_norm";
    head_norm_span), else identities."""
    from ..arch import arch_of

    spec = arch_of(attention.config.model_type)
    if not spec.head_norms:
        return nn.Identity(), nn.Identity(), False
    q_norm, k_norm = (attention.get_submodule(name.partition(".")[2]) for name in spec.head_norms)
    return q_norm, k_norm, spec.head_norm_span == "all"


@torch.no_grad()
def kv_cache_bytes_per_token(model: nn.Module, tokens: int = 16) -> float:
    """Measured: bytes the model's (dynamic) cache holds per token after a forward of `tokens`."""
    from transformers import DynamicCache

    device = next(itertools.chain(model.parameters(), model.buffers())).device
    cache = DynamicCache(config=model.config)
    ids = torch.ones(1, tokens, dtype=torch.long, device=device)
    model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total / tokens


def cache_keyword(model: nn.Module) -> str:
    """The forward's name for the cache argument: `cache` since transformers 5.x (which warns that
    `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
