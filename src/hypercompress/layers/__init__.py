"""Compressed replacements of linear layers, by the `kind` name the artifact manifest records."""

from .low_rank import LowRankLinear
from .quant_linear import QuantLinear
from .sparse_linear import SparseLinear

MODULE_KINDS = {cls.kind: cls for cls in (QuantLinear, LowRankLinear, SparseLinear)}

__all__ = ["MODULE_KINDS", "LowRankLinear", "QuantLinear", "SparseLinear"]
