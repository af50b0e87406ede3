"""Stored modules by the `kind` name the artifact manifest records."""

from __future__ import annotations

from .latent_kv import LatentKV, LatentValue
from .lora import LoRALinear
from .low_rank import LowRankLinear
from .low_rank_embedding import LowRankEmbedding
from .quant_embedding import QuantEmbedding, TiedHead
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear


_KINDS: dict[str, type] = {cls.kind: cls for cls in (QuantLinear, LowRankLinear, SparseLinear, QuantEmbedding, TiedHead,
                                                      LowRankEmbedding, LatentKV, LatentValue, LoRALinear)}


def register_kind(cls: type) -> type:
    """Class decorator for a stored kind defined outside layers/ (the hypernetwork's generator and
    generated linears, KAN layers: they live with their methods, and layers/ never imports methods/).
    Raises ValueError when another class already holds the kind's name."""
    existing = _KINDS.get(cls.kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"stored kind {cls.kind!r} is already {existing.__name__}")
    _KINDS[cls.kind] = cls
    return cls


def module_kinds() -> dict[str, type]:
    """kind -> class of every registered stored module: the built-ins above and those registered
    with register_kind (hypercompress.registry.stored_kinds imports the method packages first)."""
    return dict(_KINDS)


__all__ = ["LatentKV", "LatentValue", "LoRALinear", "LowRankEmbedding", "LowRankLinear", "QuantEmbedding", "QuantLinear", "SparseLinear", "TiedHead", "module_kinds", "register_kind"]
