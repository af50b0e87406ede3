"""THE layer-by-layer calibration runner, one copy for every architecture.

Frantar et al. 2022 (GPTQ), section 4 "layer-wise": capture the inputs of block 0 for the calibration
samples, and the arguments the model passes each block (its own layer type's attention mask: full or
sliding window; rotary embeddings); then for each block: run it with hooks feeding every target linear's inputs to the method's
`observe`, compress those linears, and re-run the compressed block to produce the next block's
inputs, so that quantization errors propagate as they will at inference. Only the block being
processed sits on the compute device; the rest of the model stays on CPU. After each block a
checkpoint (compressed tensors + next-block inputs, safetensors only) lets `resume` continue a
killed run to the byte-identical result. Under a launcher (torchrun; parallel.py) the processes
split the calibration batches (`data_parallel`) and add their statistics before each compression;
a checkpoint holds every batch, so a run resumes on any number of processes.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable

import torch
from torch import nn

from . import parallel
from .arch import arch_of
from .storage.checkpoint import Checkpoint, unreadable
from .errors import UserError
from .experts import ExpertLinears, routed_calibration, routing_report
from .block_calls import capture_block_inputs
from .methods.base import LayerwiseMethod
from .modules import replace_module
from .sources.streaming import materialize, uncompressed

BlockProgress = Callable[[int, int], None]  # (blocks done, blocks total)

OBSERVED_BUDGET_BYTES = 2 * 2**30
"""The most bytes of statistics (GPTQ's Hessians) a block's observing pass keeps at once: a block
whose linears need more (a mixture of experts: Mixtral's eight down_proj Hessians alone take 13 GB
in float64) is observed and compressed in groups, the block re-run for each, so a group sees the
earlier groups of its block already compressed (as sequential GPTQ does across blocks)."""


def observed_groups(targets: dict[str, nn.Module], method: LayerwiseMethod) -> list[dict[str, nn.Module]]:
    """`targets` (name -> layer, in block order) cut into consecutive groups whose statistics
    (method.observed_bytes) fit OBSERVED_BUDGET_BYTES; a layer larger than that alone. [] for none."""
    groups: list[dict[str, nn.Module]] = []
    size = 0
    for name, layer in targets.items():
        need = method.observed_bytes(name, layer)
        if not groups or size + need > OBSERVED_BUDGET_BYTES:
            groups.append({})
            size = 0
        groups[-1][name] = layer
        size += need
    return groups


def data_parallel(model: nn.Module, method: LayerwiseMethod, batches: int) -> bool:
    """Whether a launched run's processes split the calibration batches: each observes and
    re-runs its share, the methods' sums (LayerwiseMethod.statistics) are added over the processes
    before compressing, so every process compresses every layer alike (the one-process result up to
    the order of float64 additions). Not for methods that cannot add sums, mixtures of experts
    (the top-up of rarely routed experts counts each process's own tokens) or fewer batches than
    processes; those runs have every process observe every batch, as one process would."""
    if parallel.world() < 2 or batches < parallel.world() or method.statistics() is None:
        return False
    return not any(isinstance(m, ExpertLinears) for m in model.modules())


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
    A streamed model's blocks are read from its files one at a time (sources/streaming.py).
    Returns {"seconds", "peak_memory_bytes", "blocks", "block_seconds": wall seconds of each block run}
    and, for a mixture of experts, "expert_tokens" (experts.routing_report: the calibration tokens
    each expert was routed and those added to reach experts.MIN_EXPERT_TOKENS).
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
    hiddens, calls = capture_block_inputs(model, samples, batch_size)
    first = 0
    if resume_from is not None:
        _check_resumed(checkpoint, resume_from, hiddens, len(blocks))
        first, hiddens = resume_from[0] + 1, resume_from[1]
    calls = calls.to(device)  # each block's own arguments (the mask of its layer type)
    count = len(hiddens)
    split = data_parallel(model, method, count)
    mine = parallel.shares(count) if split else list(range(count))
    hiddens = {batch: hiddens[batch] for batch in mine}  # this process's batches
    block_seconds = []
    expert_tokens: dict[str, list[tuple[int, int]]] = {}
    for index in range(first, len(blocks)):
        tick = time.perf_counter()
        prefix = f"{spec.blocks}.{index}."
        materialize(model, prefix)  # a streamed model's block, read from its files now
        block = blocks[index].to(device)
        targets = {n: model.get_submodule(n) for n in names if n.startswith(prefix)}
        for group in observed_groups(targets, method):  # one group, unless the statistics outgrow the budget
            handles = [layer.register_forward_hook(
                lambda _m, args, _out, name=name: method.observe(name, args[0]))
                for name, layer in group.items()]
            experts = {f"{prefix}{n}": m for n, m in block.named_modules() if isinstance(m, ExpertLinears)
                       and any(t.startswith(f"{prefix}{n}.") for t in group)}
            try:
                with routed_calibration(experts) as counts:  # experts routed too few tokens get more
                    for batch, hidden in hiddens.items():
                        calls.run(block, index, batch, hidden.to(device))
                expert_tokens.update(counts)
            finally:
                for handle in handles:
                    handle.remove()
            if split:  # the processes' sums over their batches: every process compresses alike
                parallel.sum_statistics(method.statistics(), list(group))
            # the method may solve several at once (GPTQ: linears fed one input share one pass)
            for name, module in method.compress_many(list(group), lambda n: uncompressed(model, n, stage)):
                replace_module(model, name, module.to(device))
        hiddens = {batch: calls.run(block, index, batch, h.to(device)).cpu() for batch, h in hiddens.items()}
        blocks[index].to("cpu")
        if checkpoint is not None:  # all batches (process 0 writes): a resume may run on any number
            checkpoint.save(model, stage, index, parallel.gather_batches(hiddens, count) if split
                            else [hiddens[batch] for batch in range(count)])
        block_seconds.append(round(time.perf_counter() - tick, 3))
        if progress:
            progress(index + 1, len(blocks))
    report = {"seconds": time.perf_counter() - start, "peak_memory_bytes": peak_memory_bytes(device),
              "blocks": len(blocks), "block_seconds": block_seconds,
              "processes": parallel.world() if split else 1}
    if expert_tokens:
        report["expert_tokens"] = routing_report(expert_tokens)
    return report


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
