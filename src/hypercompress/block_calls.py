"""What a model passes each of its blocks, captured once per calibration batch.

`capture_block_inputs(model, samples, batch)` runs the embedding and the mask construction with
every block replaced by a recorder: block 0's hidden states and each block's own arguments
(BlockCalls: its layer type's attention mask, rotary embeddings, positions). Every block-by-block
pass runs blocks through it: the layer-wise calibration runner (layerwise.py), block-wise methods
(methods.base.BlockwiseMethod: Block-AP), the planner's sensitivities and trials.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import arch_of
from .errors import UserError


class _StopForward(Exception):
    """Raised by the capture once the last block's arguments are recorded."""


# arguments that carry a KV cache: calibration runs without one
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past", "use_cache")


def _to(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """`obj` (tensors in tuples, lists, dicts) on `device`; a tensor met twice is moved once (memo)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is kept so that its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockCalls:
    """What the model passes each block besides its hidden states, per calibration batch:
    `calls[block][batch]` = (positional, keyword arguments): that block's own layer type's attention
    mask (full or sliding window), rotary embeddings, positions, exactly as the model's forward
    builds them (transformers: `causal_mask_mapping[config.layer_types[i]]`). Blocks of one layer
    type share the same tensors, kept once on each device."""

    def __init__(self, calls: list[list[tuple[tuple, dict[str, Any]]]]):
        self.calls = calls

    def to(self, device: torch.device | str) -> "BlockCalls":
        memo: dict[int, Any] = {}
        return BlockCalls([[_to(call, device, memo) for call in batches] for batches in self.calls])

    def run(self, block: nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `index` (the module `block`: compressed, or on a device) on `hidden` of `batch`."""
        args, kwargs = self.calls[index][batch]
        return _block_output(block(hidden, *args, **kwargs))


class _Recorder(nn.Module):
    """Stands in for block `index` during the capture: records the arguments the model passes it
    and returns its input unchanged (no block needs to compute for its arguments to be known);
    attributes the model's loop reads from a block (e.g. attention_type) are the block's own."""

    def __init__(self, block: nn.Module, index: int, last: bool):
        super().__init__()
        self.block, self.index, self.last, self.sink = block, index, last, []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
        self.sink.append((self.index, hidden.detach(), tuple(args[1:]), kwargs))
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int
                         ) -> tuple[list[torch.Tensor], BlockCalls]:
    """Run the model's embedding and mask construction for each batch of `samples` (N, L), every
    block replaced by a recorder (no block computes).

    Returns (block 0's hidden states: a list of (b, L, d) tensors, one per batch; BlockCalls: the
    arguments of every block, each its own). Raises UserError for a model whose forward does not
    call each block exactly once, in order (it cannot be calibrated layer by layer)."""
    blocks = model.get_submodule(arch_of(model.config.model_type).blocks)
    originals = list(blocks)
    hiddens: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in originals]
    memo: dict[int, Any] = {}
    try:
        recorders = [_Recorder(block, i, last=i == len(originals) - 1) for i, block in enumerate(originals)]
        for i, recorder in enumerate(recorders):
            blocks[i] = recorder
        for batch in samples.split(batch_size):
            sink: list = []
            for recorder in recorders:
                recorder.sink = sink
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            if [entry[0] for entry in sink] != list(range(len(originals))):
                raise UserError(f"'{model.config.model_type}' does not call each of its {len(originals)} "
                                "blocks once, in order: it cannot be calibrated layer by layer; use a "
                                "data-free method (rtn, svd, magnitude)")
            hiddens.append(sink[0][1])
            for index, _, args, kwargs in sink:
                calls[index].append(_to((args, kwargs), "cpu", memo))
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return hiddens, BlockCalls(calls)
