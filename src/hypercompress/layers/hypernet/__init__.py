"""The hypernetwork's stored kinds: the generator (layer embeddings -> recurrent backbone over depth ->
low-rank heads) and the linears it generates; the training is methods/hypernet."""

from .generator import HyperGenerator
from .linear import GeneratedLinear

__all__ = ["GeneratedLinear", "HyperGenerator"]
