"""Block-wise training of all parameters (Block-AP; EfficientQAT, Chen et al. 2024, section 3.2).

Block by block, the block's latent weights and grid scales (FakeQuantLinear) are trained so that
the quantized block, fed the quantized model's own inputs to it, reproduces the original block's
output on the original model's inputs:
    min_{W, s} || f_i^q(h_i^q) - f_i(h_i) ||^2 / mean(f_i(h_i)^2)
over calibration batches (hidden states (b, T, d)), so each block also corrects the error the
blocks before it left (as GPTQ's layer-wise pass propagates it). The next block's inputs are then
the trained block's outputs: the walk of every block-wise method (methods.base.BlockwiseMethod,
each block's own mask and rotary arguments from block_calls.capture_block_inputs). AdamW, cosine
decay to 10%, gradient-norm clipping at 1; each step's micro-batches drawn by a generator seeded
with (seed, block, step). Under a launcher each process takes its share of a step's micro-batches
and the gradients are summed: with the same micro_batch, one process and several take the same steps.
Each step's loss, tokens_per_second and learning rates (lr: latent weights, lr_1: scales and zeros)
go to the tracker under "<prefix>/block_ap", counted over all blocks (block b's step s is
b * steps + s), with the block's index.
After each block its trained tensors are checkpointed (safetensors, sha256 recorded) so a killed
run resumes at the next block with the same result.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ... import parallel
from ...arch import arch_of
from ...errors import UserError
from ...tracking import Tracker, learning_rates
from ..base import BlockData, BlockwiseMethod
from .fake_quant import FakeQuantLinear

PROGRESS = "blocks.json"  # {"done": k, "files": [{"file", "bytes", "sha256"} per finished block]}


def block_ap(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, fakes: dict[str, FakeQuantLinear], *,
             steps: int, batch: int, lr: float, scale_lr: float, seed: int = 0, device: str = "cpu",
             checkpoint_dir: Path | None = None, resume: bool = False,
             progress: Callable[[int, int, str], None] | None = None,
             tracker: Tracker | None = None, autocast=None, micro_batch: int = 0) -> list[float]:
    """Train the FakeQuantLinears `fakes` (name -> module inside `student`'s blocks) block by block
    against `teacher` on `windows` (N, T) token ids, `steps` AdamW steps of `batch` windows per block
    (latent weights at `lr`, scales and zeros at `scale_lr`), each forward under `autocast` (a context
    manager: the engine's bf16 autocast, training/engine.py; None: float32). Returns each block's final relative
    output error. progress(blocks done, blocks, note)."""
    method = BlockAP(fakes, steps=steps, batch=batch, lr=lr, scale_lr=scale_lr, seed=seed, tracker=tracker,
                     autocast=autocast, micro_batch=micro_batch, blocks=arch_of(student.config.model_type).blocks)
    method.walk(student, teacher, windows, list(fakes), device=device, progress=progress,
                checkpoint_dir=checkpoint_dir, resume=resume)
    return method.errors


class BlockAP(BlockwiseMethod):
    """Block-AP as a block-wise method (methods.base.BlockwiseMethod walks the blocks): each block's
    `fakes` trained by _train_block; their tensors checkpointed after each block. A step of `batch`
    windows runs as forwards of `micro_batch` (default: batch / processes), this process taking its
    share. UserError for a batch that does not split over the processes."""

    def __init__(self, fakes: dict[str, FakeQuantLinear], *, steps: int, batch: int, lr: float, scale_lr: float,
                 seed: int, tracker: Tracker | None, autocast, micro_batch: int, blocks: str):
        super().__init__(config=None)  # trained as part of qat, with qat's settings
        processes = parallel.world()
        micro = micro_batch or batch // processes  # windows per forward: the same micro_batch gives the same steps
        if batch % micro or (batch // micro) % processes:  # on one process and on several
            raise UserError(f"qat batch {batch} in micro-batches of {micro} does not split over {processes} processes; "
                            f"use a batch of a multiple of {micro * processes}")
        self.fakes, self.blocks, self.micro_batch, self.chunks = fakes, blocks, micro, batch // micro
        self.steps, self.lr, self.scale_lr, self.seed = steps, lr, scale_lr, seed
        self.tracker, self.autocast = tracker, autocast
        self.errors: list[float] = []

    def _trained(self, index: int) -> dict[str, FakeQuantLinear]:
        return {n: m for n, m in self.fakes.items() if n.startswith(f"{self.blocks}.{index}.")}

    def fit_block(self, block: nn.Module, data: BlockData) -> str:
        error = _train_block(block, data.index, data.calls, data.inputs, data.targets, self._trained(data.index),
                             self.steps, self.lr, self.scale_lr, self.seed, next(block.parameters()).device,
                             self.tracker, self.autocast, self.chunks)
        self.errors.append(error)
        return f"block output error {error:.4f}"

    def restore(self, directory: Path, model: nn.Module) -> int:
        return _restore(directory, model.get_submodule(self.blocks), self.fakes, self.blocks)

    def save_block(self, directory: Path, index: int, block: nn.Module) -> None:
        _save(directory, index, self._trained(index))


def _train_block(block, index, calls, inputs, targets, trained, steps, lr, scale_lr, seed, device,
                 tracker: Tracker | None = None, autocast=None, chunks: int = 1) -> float:
    """`steps` steps on block `index`; each step draws `chunks` captured micro-batches (seeded with
    (seed, block, step), the same on every process), this process takes its share of them, and the
    loss is the mean over the step's windows of each window's relative output error, so the summed
    gradients are the one-process step's. Returns the last step's loss."""
    weights = [m.weight for m in trained.values()]
    grids = [p for m in trained.values() for n, p in m.named_parameters() if n in ("scales", "zeros")]
    frozen = [(p, p.requires_grad) for p in block.parameters() if all(p is not q for q in weights + grids)]
    for p, _ in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": grids, "lr": scale_lr}], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1))))
    processes, rank = parallel.world(), parallel.rank()
    error = float("nan")
    for step in range(steps):
        tick = time.perf_counter()
        picks = torch.randint(0, len(inputs), (chunks,),
                              generator=torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_000_003 + step))
        windows = sum(inputs[int(p)].shape[0] for p in picks)
        optimizer.zero_grad(set_to_none=True)
        rates = learning_rates(optimizer)
        total = torch.zeros(1, device=device)
        for pick in picks[rank::processes].tolist():
            target = targets[pick].to(device).float()
            with autocast if autocast is not None else contextlib.nullcontext():
                out = calls.run(block, index, pick, inputs[pick].to(device)).float()
            per_window = (out - target).pow(2).flatten(1).mean(1) / target.pow(2).flatten(1).mean(1).clamp_min(1e-12)
            loss = per_window.sum() / windows
            loss.backward()
            total += loss.detach()
        value = parallel.total(total)[0].item()
        if not math.isfinite(value):
            raise UserError(f"qat diverged in block {index} at step {step} (loss {value}); lower lr")
        if processes > 1:
            parallel.sum_gradients(weights + grids)
        torch.nn.utils.clip_grad_norm_(weights + grids, 1.0)
        optimizer.step()
        schedule.step()
        error = value
        if tracker is not None:
            tokens = windows * targets[0].shape[1]
            tracker.log({"loss": value, "tokens_per_second": tokens / (time.perf_counter() - tick), "block": index,
                         **rates}, index * steps + step + 1, prefix=f"{tracker.prefix}/block_ap")
    for p, flag in frozen:
        p.requires_grad_(flag)
    return error


def _tensors(trained: dict[str, FakeQuantLinear]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t.detach().cpu() for n, m in trained.items()
            for k, t in (("weight", m.weight), ("scales", m.scales), ("zeros", m.zeros))}


def _save(directory: Path, index: int, trained: dict[str, FakeQuantLinear]) -> None:
    """Block `index`'s trained tensors as a new file, then blocks.json (atomically) naming it."""
    from ...storage.reader import file_sha256
    from ...storage.checkpoint import read_json, save_json, save_tensors

    directory.mkdir(parents=True, exist_ok=True)
    state = read_json(directory / PROGRESS, directory) if (directory / PROGRESS).exists() else {"files": []}
    file = f"block-{index}-{secrets.token_hex(4)}.safetensors"
    save_tensors(directory / file, _tensors(trained), {"block": str(index)})
    files = state["files"][:index] + [{"file": file, "bytes": (directory / file).stat().st_size,
                                       "sha256": file_sha256(directory / file)}]
    save_json(directory / PROGRESS, {"done": index + 1, "files": files})


def _restore(directory: Path, blocks: nn.ModuleList, fakes: dict[str, FakeQuantLinear], prefix: str) -> int:
    """Load every finished block's tensors (each file's size, names, shapes and sha256 checked
    first); returns the number of blocks done (0 without a checkpoint)."""
    from ...storage.checkpoint import _is_index, check_sha256, read_json, read_tensors, tensor_index, unreadable, \
        valid_file_name

    if not (directory / PROGRESS).exists():
        return 0
    state = read_json(directory / PROGRESS, directory)
    done, files = state.get("done"), state.get("files")
    if not (_is_index(done) and isinstance(files, list) and len(files) == done <= len(blocks)):
        raise unreadable(directory, f"{PROGRESS} lacks a valid block count or file list")
    for index, entry in enumerate(files):
        trained = {n: m for n, m in fakes.items() if n.startswith(f"{prefix}.{index}.")}
        expected = {k: (tuple(t.shape), t.dtype) for k, t in _tensors(trained).items()}
        if not (isinstance(entry, dict) and valid_file_name(entry.get("file")) and _is_index(entry.get("bytes"))):
            raise unreadable(directory, f"{PROGRESS} names no valid file for block {index}")
        path = directory / entry["file"]
        if tensor_index(path, directory, entry["bytes"]) != expected:
            raise unreadable(directory, f"{path.name} does not hold block {index}'s trained tensors of this run")
        check_sha256(path, directory, entry.get("sha256"), PROGRESS)
        tensors = read_tensors(path, directory, sorted(expected))
        with torch.no_grad():
            for name, module in trained.items():
                for key in ("weight", "scales", "zeros"):
                    getattr(module, key).copy_(tensors[f"{name}.{key}"])
    return done
