"""The layer-wise calibration runner's former module name, kept so code written against it runs on:
the runner is `hypercompress.layerwise` (renamed when the package took folders that show its
architecture) and the block capture `hypercompress.block_calls`. New code imports those."""

from __future__ import annotations

from .block_calls import BlockCalls, capture_block_inputs
from .layerwise import peak_memory_bytes, run_layerwise

__all__ = ["BlockCalls", "capture_block_inputs", "peak_memory_bytes", "run_layerwise"]
