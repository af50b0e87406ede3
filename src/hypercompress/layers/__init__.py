"""Compressed replacements of linear layers, by the `kind` name the artifact manifest records."""

from .low_rank import LowRankLinear
from .quant_embedding import QuantEmbedding, TiedHead
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear

MODULE_KINDS = {cls.kind: cls for cls in (QuantLinear, LowRankLinear, SparseLinear,
                                          QuantEmbedding, TiedHead)}

__all__ = ["MODULE_KINDS", "LowRankLinear", "QuantEmbedding", "QuantLinear", "SparseLinear",
           "TiedHead"]
