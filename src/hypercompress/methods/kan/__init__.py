"""The KAN hierarchical compressor: Kolmogorov-Arnold networks that represent weights coarse to fine."""

from .compressor import HierarchicalCompressor, decompress_weights

__all__ = ["HierarchicalCompressor", "decompress_weights"]
