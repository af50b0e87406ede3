"""Stored modules by the `kind` name the artifact manifest records: every kind an artifact can hold,
the hypernetwork's and KAN's included (layers/ never imports methods/)."""

from __future__ import annotations

from .build import KINDS
from .latent_kv import LatentKV, LatentValue
from .lora import LoRALinear
from .low_rank import LowRankLinear
from .low_rank_embedding import LowRankEmbedding
from .quant_embedding import QuantEmbedding, TiedHead
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear
from .hypernet import GeneratedLinear, HyperGenerator
from .kan import KanLinear


_KINDS: dict[str, type] = {cls.kind: cls for cls in (QuantLinear, LowRankLinear, SparseLinear, QuantEmbedding, TiedHead,
                                                      LowRankEmbedding, LatentKV, LatentValue, LoRALinear, KanLinear,
                                                      HyperGenerator, GeneratedLinear)}


KINDS.update(_KINDS)  # what build_stored builds


def module_kinds() -> dict[str, type]:
    """kind -> class of every stored module an artifact can hold (all of them live in layers/, so
    reading an artifact imports no method)."""
    return dict(_KINDS)


__all__ = ["GeneratedLinear", "HyperGenerator", "KanLinear", "LatentKV", "LatentValue", "LoRALinear", "LowRankEmbedding", "LowRankLinear", "QuantEmbedding", "QuantLinear", "SparseLinear", "TiedHead", "module_kinds"]
