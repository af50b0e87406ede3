"""THE layer-by-layer calibration runner, one copy for every architecture.

Frantar et al. 2022 (GPTQ), section 4 "layer-wise": capture the inputs of block 0 for the calibration
samples; then for each block: run it with hooks feeding every target linear's inputs to the method's
`observe`, compress those linears, and re-run the compressed block to produce the next block's
inputs, so that quantization errors propagate as they will at inference. Only the block being
processed sits on the compute device; the rest of the model stays on CPU. After each block a
checkpoint (compressed tensors + next-block inputs, safetensors only) lets `resume` continue a
killed run to the byte-identical result.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable

import torch
from torch import nn

from .arch import arch_of
from .checkpoint import Checkpoint, unreadable
from .errors import UserError
from .methods.base import LayerwiseMethod
from .modules import replace_module, uncompressed

BlockProgress = Callable[[int, int], None]  # (blocks done, blocks total)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int):
    """Run the model up to block 0 for each batch of `samples` (N, L).

    Returns (hidden states: list of (b, L, d) tensors, keyword arguments: list of dicts), one per
    batch, exactly as the model passes them to its blocks (masks, rotary embeddings, positions).
    """
    blocks = model.get_submodule(arch_of(model.config.model_type).blocks)
    hiddens, kwargs_list = [], []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                               "layer_past", "use_cache")}
        hiddens.append(hidden.detach())
        kwargs_list.append(_to(kwargs, "cpu"))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in samples.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hiddens, kwargs_list


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def peak_memory_bytes(device: str) -> int:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@torch.no_grad()
def run_layerwise(model: nn.Module, method: LayerwiseMethod, names: list[str], samples: torch.Tensor,
                  *, stage: int = 0, device: str = "cpu", batch_size: int = 8,
                  checkpoint: Checkpoint | None = None,
                  resume_from: tuple[int, list[torch.Tensor]] | None = None,
                  progress: BlockProgress | None = None) -> dict[str, Any]:
    """Compress `names` (linears inside blocks) block by block with `method`, errors propagated.

    resume_from: (last finished block, its output hidden states) from a checkpoint.
    Returns {"seconds", "peak_memory_bytes", "blocks"}.
    """
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    outside = [n for n in names if not n.startswith(f"{spec.blocks}.")]
    if outside:
        raise UserError(f"'{method.name}' calibrates linears inside the transformer blocks only; "
                        f"'{outside[0]}' is outside: compress it in a separate rtn stage")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    hiddens, kwargs_list = capture_block_inputs(model, samples, batch_size)
    first = 0
    if resume_from is not None:
        _check_resumed(checkpoint, resume_from, hiddens, len(blocks))
        first, hiddens = resume_from[0] + 1, resume_from[1]
    kwargs_dev = [_to(kw, device) for kw in kwargs_list]  # the same for every block
    for index in range(first, len(blocks)):
        block = blocks[index].to(device)
        prefix = f"{spec.blocks}.{index}."
        targets = {n: model.get_submodule(n) for n in names if n.startswith(prefix)}
        if targets:
            handles = [layer.register_forward_hook(
                lambda _m, args, _out, name=name: method.observe(name, args[0]))
                for name, layer in targets.items()]
            try:
                for hidden, kwargs in zip(hiddens, kwargs_dev):
                    block(hidden.to(device), **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            for name in targets:
                layer = uncompressed(model, name, stage)
                replace_module(model, name, method.compress(name, layer).to(device))
        hiddens = [_block_output(block(h.to(device), **kw)).cpu() for h, kw in zip(hiddens, kwargs_dev)]
        blocks[index].to("cpu")
        if checkpoint is not None:
            checkpoint.save(model, stage, index, hiddens)
        if progress:
            progress(index + 1, len(blocks))
    return {"seconds": time.perf_counter() - start, "peak_memory_bytes": peak_memory_bytes(device),
            "blocks": len(blocks)}


def _check_resumed(checkpoint: Checkpoint | None, resume_from: tuple[int, list[torch.Tensor]],
                   captured: list[torch.Tensor], blocks: int) -> None:
    """A checkpoint's block and hidden states must fit this run: a block of the model, as many
    batches as captured, each of the captured shape and dtype (else UserError naming the fix)."""
    where = checkpoint.dir if checkpoint is not None else "the checkpoint"
    block, hiddens = resume_from
    if block >= blocks:
        raise unreadable(where, f"it records block {block} of a model with {blocks} blocks")
    if [(h.shape, h.dtype) for h in hiddens] != [(h.shape, h.dtype) for h in captured]:
        raise unreadable(where, "its hidden states do not match this run's calibration batches "
                                "(resume with the killed run's --calib-batch)")
