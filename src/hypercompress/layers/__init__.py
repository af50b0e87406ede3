"""Stored modules by the `kind` name the artifact manifest records."""

from __future__ import annotations

from .latent_kv import LatentKV, LatentValue
from .lora import LoRALinear
from .low_rank import LowRankLinear
from .low_rank_embedding import LowRankEmbedding
from .quant_embedding import QuantEmbedding, TiedHead
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear


def module_kinds() -> dict[str, type]:
    """kind -> class of every module an artifact can hold (the hypernetwork's imported lazily: it
    and KAN layers live with their methods, which import this package)."""
    from ..methods.hypernet.generator import HyperGenerator
    from ..methods.hypernet.linear import GeneratedLinear
    from ..methods.kan.method import KanLinear

    return {cls.kind: cls for cls in (QuantLinear, LowRankLinear, SparseLinear, QuantEmbedding, TiedHead,
                                      LowRankEmbedding, HyperGenerator, GeneratedLinear, KanLinear,
                                      LatentKV, LatentValue, LoRALinear)}


__all__ = ["LatentKV", "LatentValue", "LoRALinear", "LowRankEmbedding", "LowRankLinear", "QuantEmbedding", "QuantLinear", "SparseLinear", "TiedHead", "module_kinds"]
