"""Embedding factorization: Embedding(V, D) -> Embedding(V, r) + Linear(r, D), the tied lm_head with it.

E (V, D) = U S V^T (SVD); A = U_r S_r^(1/2) (V, r) is rounded to its storage (float16 or b-bit
per-row codes), then B (r, D) = argmin_B ||E - A_hat B||_F = lstsq(A_hat, E) absorbs A's rounding
error. The square root balances A's columns: with A = U_r S_r a row's one scale follows the first
column and the small components round to noise (measured on SmolLM2's embedding, 4-bit, rank 256:
relative error 0.239 with S, 0.194 with S^(1/2), truncation alone 0.188).
A tied lm_head becomes a TiedHead computing logits = (x B^T) A_hat^T (never the (V, D) table), so the
factors are stored and counted once. Data-free; a stage without targets factors the token embedding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig, check
from ..errors import UserError
from ..layers.low_rank_embedding import LowRankEmbedding
from ..registry import register
from .base import LayerwiseMethod


@dataclass
class FactorEmbeddingConfig(MethodConfig):
    rank: int = 64      # r: inner size of the factorization
    bits: int = 8       # storage of A (V, r): 16 (float16), 8 or 4 (per-row codes)

    def validate(self) -> None:
        check(self.rank >= 1, f"rank={self.rank}: must be >= 1")
        check(self.bits in (4, 8, 16), f"bits={self.bits}: must be 4, 8 or 16")


@functools.lru_cache(maxsize=None)
def max_useful_rank(vocab: int, dim: int, bits: int) -> int:
    """The largest rank r <= min(vocab, dim) whose factors store fewer bits than the float16 table
    (LowRankEmbedding's storage, measured on empty modules; it grows with r)."""
    dense, low, high = 16 * vocab * dim, 0, min(vocab, dim)
    while low < high:
        mid = (low + high + 1) // 2
        if LowRankEmbedding(vocab, dim, mid, bits).storage_bits() < dense:
            low = mid
        else:
            high = mid - 1
    return low


@register("factor_embedding", FactorEmbeddingConfig)
class FactorEmbedding(LayerwiseMethod):
    default_targets = "embedding"  # the token embedding, from the architecture table
    def check_modules(self, modules: dict[str, nn.Module]) -> None:
        """Refuse a rank at or past the break-even of a selected embedding (UserError)."""
        c = self.config
        for name, layer in modules.items():
            if not isinstance(layer, nn.Embedding):
                continue  # compress names the problem
            vocab, dim = layer.weight.shape
            if c.rank > min(vocab, dim) or LowRankEmbedding(vocab, dim, c.rank, c.bits).storage_bits() >= 16 * vocab * dim:
                limit = max_useful_rank(vocab, dim, c.bits)
                raise UserError(f"factor_embedding: rank={c.rank} with bits={c.bits} is at or past the break-even "
                                f"rank of {name} ({vocab}x{dim}), where the factors store as much as the table "
                                f"or more; the largest useful rank is {limit}: set rank to 1..{limit}")

    def compress(self, name: str, layer: nn.Module) -> LowRankEmbedding:
        if not isinstance(layer, nn.Embedding):
            raise UserError(f"factor_embedding: '{name}' is not an embedding; set targets to the token "
                            "embedding (e.g. targets=['^model\\\\.embed_tokens$']), use svd/asvd for linears")
        table = layer.weight.detach().double()  # float64: rounding to codes must not see solver noise
        vocab, dim = table.shape
        rank = min(self.config.rank, vocab, dim)
        u, s, vh = torch.linalg.svd(table, full_matrices=False)
        module = LowRankEmbedding(vocab, dim, rank, self.config.bits)
        module.set_factors(u[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank])
        with torch.no_grad():  # B refitted to the stored A
            module.up.copy_(torch.linalg.lstsq(module.factor_a().double(), table).solution.half())
        return module
