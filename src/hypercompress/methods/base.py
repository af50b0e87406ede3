"""Base class of per-layer methods (the extension point of docs/DESIGN).

A per-layer method sees one linear layer at a time: `observe(name, x)` receives the layer's inputs
on calibration data (only for methods with `needs_calibration`), `compress(name, layer)` returns the
CompressedModule that replaces it.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ..config import MethodConfig
from ..modules import CompressedModule


class LayerwiseMethod(abc.ABC):
    name: str = ""
    needs_calibration: bool = False

    def __init__(self, config: MethodConfig):
        self.config = config

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Accumulate statistics of the inputs x (..., in_features) of layer `name`.

        Methods without calibration (needs_calibration False) keep no statistics.
        """

    @abc.abstractmethod
    def compress(self, name: str, layer: nn.Module) -> CompressedModule:
        """Return the compressed replacement of `layer` (an nn.Linear or GPT-2 Conv1D)."""
