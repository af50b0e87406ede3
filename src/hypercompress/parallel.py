"""Data-parallel distillation across processes started by a launcher (torchrun, accelerate launch).

    torchrun --nproc-per-node 4 -m hypercompress compress smollm2-135m --target-ratio 16 --distill \\
        --calib FILE --device cuda --out DIR

Every process runs the same command: it loads the model, calibrates the same way (the seed is
shared, so every process holds the same compressed student) and joins the launcher's process group
through accelerate's PartialState (NCCL on GPUs, gloo on CPUs), on the GPU numbered by its
LOCAL_RANK. Distillation then splits each step's batch of windows between the processes. Replicated
(sharding "ddp"), after the backward pass the gradients of the trained tensors are summed with one
all-reduce (what torch DDP does for a module's parameters; here the trained tensors are stored
buffers turned into parameters, or a generator's, so they are reduced directly), so every process
takes the same optimizer step and the result is the single-process result with the same total
batch (exactly for every loss term: each is a mean over windows, training/distill.py); sharded
("fsdp", training/sharding.py), FSDP2 reduce-scatters them. Process 0 alone writes the artifact
(and a replicated run's checkpoints). Nothing here starts processes: that is the launcher's job.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist

from .errors import UserError


def launched() -> bool:
    """Whether a launcher started several processes of this command."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (RANK), before any process group is joined; 0
    outside a launcher or when RANK is not a number."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def check_device(device: str) -> None:
    """UserError (one line, the fix) unless `device` is "cpu", or "cuda" / "cuda:i" with CUDA present."""
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device {device}: must be cpu or cuda; pass one of them")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available; use --device cpu")


def setup(device: str) -> str:
    """Join the launcher's process group when there is one; returns this process's device
    (cuda -> cuda:LOCAL_RANK; cpu stays cpu, over gloo)."""
    if not launched():
        return device
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return "cpu" if device == "cpu" else str(state.device)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the processes (one flat all-reduce; a
    parameter without a gradient counts as zeros, so every process reduces the same layout): each
    process's loss was already divided by the whole step's batch (training/distill.py)."""
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()


@torch.no_grad()
def total(values: torch.Tensor) -> torch.Tensor:
    """values (k,) summed over the processes."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


@torch.no_grad()
def agree(value: int) -> int:
    """Process 0's `value` (an int or bool) in every process: a decision each would take by its own
    clock (a checkpoint every few minutes, the steps a time budget leaves) that the processes
    must take together, or one waits in a collective the others never reach."""
    if not active():
        return value
    shared = torch.tensor([int(value)], dtype=torch.int64, device=collective_device())
    dist.broadcast(shared, src=0)
    return type(value)(shared.item())


def collective_device() -> torch.device:
    """Where a collective's tensors must sit: the current GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def sum_statistics(statistics: list[dict], names: list[str]) -> None:
    """Replace each process's calibration sums for `names` (LayerwiseMethod.statistics: tensors
    and int counts; a table holds the names of its own method) by their sums over the processes,
    in place. Every process must hold the same names (each observed at least one batch)."""
    for table in statistics:
        for name in sorted(n for n in names if n in table):
            value = table[name]
            if isinstance(value, torch.Tensor):
                moved = value.to(collective_device())
                dist.all_reduce(moved)
                table[name] = moved.to(value.device)
            else:
                count = torch.tensor([int(value)], dtype=torch.int64,
                                     device=collective_device())
                dist.all_reduce(count)
                table[name] = int(count.item())


def shares(count: int) -> list[int]:
    """The batch indices (of `count`) this process takes: every world()-th from its rank."""
    return list(range(rank(), count, world()))


def gather_batches(mine: dict[int, torch.Tensor], count: int) -> list[torch.Tensor] | None:
    """Process 0: all `count` batches, each from the process that holds it (`mine`: batch index ->
    tensor on the CPU); the other processes: None."""
    parts: list = [None] * world() if is_main() else None
    dist.gather_object(mine, parts, dst=0)
    if not is_main():
        return None
    merged = {index: tensor for part in parts for index, tensor in part.items()}
    return [merged[index] for index in range(count)]
