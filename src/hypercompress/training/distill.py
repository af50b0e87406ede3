"""Distillation against a frozen teacher: the training loop shared by every trained representation.

Loss per step on a batch of B windows of T tokens, the mean over windows of
    KL(teacher || student) of the next-token distributions, mean over the window's positions
  + local_weight * mean_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2             (per-block output matching)
  + stability_weight * mean_l (log(rms(h_s^l) / rms(h_t^l)))^2           (generated blocks keep scale)
h^l are the window's block outputs (hidden_states[1:]). The KL is computed from the final hidden
states and the output matrices in chunks of positions (kl.py): no full float32 logits. The
student's trainable tensors are produced by `refresh()` before every forward (a hypernetwork
regenerating the weights, with autograd). The engine (engine.py) sets precision (bf16 autocast
with float32 master tensors, a bf16 teacher), compilation, micro-batches and the token / time
budgets. AdamW (fused on CUDA) with cosine decay to 10% of lr, gradient-norm clipping at 1.0;
windows drawn by a generator seeded with (seed, step), so a resumed run sees the same batches.
Checkpoints (safetensors + JSON, never pickles) hold the trainable tensors and AdamW's moments.
Under a launcher (parallel.py) each process takes its share of every step's micro-batches and the
gradients are summed before the step: the same step as one process takes, up to float rounding.
Every step's loss, kl, local, stability, tokens seen, tokens_per_second and learning rate go to
the caller's tracking.Tracker (TensorBoard / W&B) under its prefix ("distill", "qat", "hypernet").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import parallel
from ..errors import UserError
from ..layers.base import CompressedModule
from ..modules import head_logits
from ..tracking import Tracker, learning_rates
from .corpus import mixed_picks
from . import checkpoint, sharding
from .engine import Clock, Engine, compile_blocks, cosine, frozen_teacher, uncompile_blocks
from .kl import chunked_kl, kl_to_teacher

# progress(step, total_steps, note) -- note: "loss 1.23 | kl 0.98 | 4,100 tok/s"
TrainProgress = Callable[[int, int, str], None]
# a checkpoint (latent weights + AdamW moments: 1.6 GB for SmolLM2-135M, about 2.5 s to write) every
# 3 minutes of training: every 50 steps took 125 s of a 9-minute qat run on an H100 (2,495 steps)
CHECKPOINT_SECONDS = 180.0


@dataclass
class DistillSettings:
    steps: int
    batch: int
    lr: float
    local_weight: float = 0.1
    stability_weight: float = 0.01
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0: every CHECKPOINT_SECONDS of training
    optimizer: str = "adamw"   # or "adafactor" (factored second moments: low memory, Shazeer & Stern 2018)
    engine: Engine = field(default_factory=Engine)  # precision, compilation, micro-batches, budgets
    match_blocks: bool = True  # the local and stability terms (False: KL alone, for another teacher)


def train_norms(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Every norm's weight made trainable and registered in `params` by name (stored as float16
    anyway, so training them costs no bytes)."""
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.requires_grad_(True)
            params[f"{name}.weight"] = module.weight


def window_block_losses(teacher_hidden, student_hidden) -> tuple[torch.Tensor, torch.Tensor]:
    """(local matching, activation stability) per window over block outputs hidden_states[1:], each
    (B,) float32: mean over blocks of ||h_s - h_t||^2 / ||h_t||^2 and of log(rms(h_s) / rms(h_t))^2 per
    window. Per window, so a batch's loss is the mean of its windows' and accumulates exactly over
    micro-batches and processes. A student with fewer blocks (depth-pruned) is matched on the final
    hidden state only."""
    local, stability = [], []
    pairs = zip(teacher_hidden[1:], student_hidden[1:]) if len(teacher_hidden) == len(student_hidden) \
        else [(teacher_hidden[-1], student_hidden[-1])]
    for t, s in pairs:
        t, s = t.float().flatten(1), s.float().flatten(1)
        power = t.pow(2).mean(1).clamp_min(1e-12)
        local.append((s - t).pow(2).mean(1) / power)
        stability.append(0.25 * torch.log(s.pow(2).mean(1).clamp_min(1e-12) / power) ** 2)
    return torch.stack(local).mean(0), torch.stack(stability).mean(0)


def head_matrix(model: nn.Module) -> torch.Tensor | None:
    """The (V, D) matrix the model's output layer multiplies by (differentiable in what it is
    computed from: a fake-quantized head's latent weights and scales), or None for a head that is
    not a plain matrix product (a bias, soft-capping). A stored head (a teacher compressed by an
    earlier stage: its tied QuantEmbedding, a quantized or factorized head) gives its dense matrix,
    (V, D) float32: far smaller than the (B T, V) logits the unchunked KL would hold instead."""
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None):
        return None
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    matrix = getattr(head, "logit_matrix", None)  # training-time heads (fake_quant.py) say how
    if callable(matrix):
        return matrix()
    if isinstance(head, CompressedModule) and getattr(head, "bias", None) is None:
        return head.dense_weight(torch.float32)
    return None


def _kl_sum(student, teacher, student_out, teacher_out, dtype) -> torch.Tensor:
    """Sum over windows of each window's mean KL(teacher || student) over its predicted positions,
    over the vocabulary rows both output layers hold (another teacher may pad its own to more:
    training/teacher.py)."""
    h_s, h_t = student_out.hidden_states[-1][:, :-1], teacher_out.hidden_states[-1][:, :-1]
    windows = h_s.shape[0]
    w_s, w_t = head_matrix(student), head_matrix(teacher)
    if w_s is not None and w_t is not None:
        rows = min(w_s.shape[0], w_t.shape[0])
        kl = chunked_kl(h_s.reshape(-1, h_s.shape[-1]), w_s[:rows], h_t.reshape(-1, h_t.shape[-1]), w_t[:rows],
                        dtype=dtype)
    else:  # full logits through the head modules
        z_t, z_s = head_logits(teacher, h_t), head_logits(student, h_s)  # soft-capped where the model caps
        rows = min(z_t.shape[-1], z_s.shape[-1])
        kl = kl_to_teacher(z_t[..., :rows], z_s[..., :rows])
    return kl * windows


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, params: dict[str, nn.Parameter],
            refresh: Callable[[], None] | None, settings: DistillSettings, device: str = "cpu",
            checkpoint_dir: Path | None = None, resume: bool = False,
            progress: TrainProgress | None = None,
            after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
            lr_factor: Callable[[str], float] | None = None,
            tracker: Tracker | None = None, mix: tuple[int, float] | None = None) -> list[dict[str, float]]:
    """Train `params` (by name) so that `student` matches `teacher` on `windows` (N, T) token ids.
    `refresh()`, when given, makes the student's weights from `params` before every forward (a
    hypernetwork); without it `params` are the student modules' own parameters.
    `mix` = (n, share): the first n windows are calibration text, the rest teacher-written, and each
    window of a step is a written one with probability `share` (corpus.mixed_picks); else all
    windows are drawn alike.

    Returns the history: one dict per step (loss, kl, local, stability, tokens (seen so far),
    tokens_per_second, lr: the first parameter group's learning rate of that step); each also goes
    to `tracker` when given. The run's length: settings.steps, or settings.engine's token budget,
    cut short by its time budget (engine.py). `after_step(step, optimizer)` runs after every update
    (ReLoRA merges); `lr_factor(name)` scales the learning rate of one trained tensor (default 1).
    Under a launcher the run is sharded (FSDP2, sharding.py) or replicated as settings.engine's
    `sharding` decides; either way `params` hold the trained values when it returns.
    """
    engine = settings.engine
    engine.validate(settings.batch)
    length = windows.shape[1]
    steps = engine.steps(settings.steps, settings.batch * length)
    processes, rank = parallel.world(), parallel.rank()
    micro = engine.micro_batch or max(settings.batch // processes, 1)  # the same micro_batch: the same steps
    if settings.batch % micro or (settings.batch // micro) % processes:  # on one process and on several
        raise UserError(f"batch {settings.batch} in micro-batches of {micro} does not split over {processes} "
                        f"processes; use a batch of a multiple of {micro * processes}")
    sharded = sharding.decide(engine, student, teacher, params, device=device, optimizer=settings.optimizer,
                              generated=refresh is not None, after_step=after_step is not None)
    dtype = engine.dtype(device)
    layout = None
    if sharded:  # the optimizer steps plain views of this process's rows (sharding.py)
        shards = sharding.ShardedPair(DistillPair(student, teacher, settings, dtype, engine, device), params,
                                      engine, device)
        pair, trained, layout = shards.module, shards.views, shards.layout
    else:
        pair, trained = DistillPair(student, frozen_teacher(teacher, engine, device), settings, dtype, engine,
                                    device), params
    optimizer = _optimizer(trained, settings, lr_factor, fused=str(device).startswith("cuda"))
    start, seconds_before = 0, 0.0
    if checkpoint_dir is not None and resume:
        start, seconds_before = checkpoint.restore(checkpoint_dir, trained, optimizer, layout)
    history: list[dict[str, float]] = []
    compile_blocks(pair.student, engine, device)
    if pair.teacher is not teacher:
        compile_blocks(pair.teacher, engine, device)
    clock = Clock(steps, engine.max_minutes, start)
    seen = start * settings.batch * length
    saved = time.perf_counter()
    try:
        step = start
        while step < _planned(clock, step):
            tick = time.perf_counter()
            for group in optimizer.param_groups:  # this step's rate: cosine over the (possibly shortened) run
                group["lr"] = group["base_lr"] * cosine(step / clock.steps)
            rates = learning_rates(optimizer)
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            picks = torch.randint(0, windows.shape[0], (settings.batch,), generator=generator) if mix is None \
                else mixed_picks(settings.batch, mix[0], windows.shape[0] - mix[0], mix[1], generator)
            optimizer.zero_grad(set_to_none=True)
            if sharded:
                shards.zero_grad()
            sums = torch.zeros(4, device=device)
            for chunk in list(picks.split(micro))[rank::processes]:  # this process's micro-batches
                if refresh is not None:
                    refresh()
                loss_sums = pair(windows[chunk].to(device))
                (loss_sums[0] / settings.batch).backward()  # the micro-batches' gradients add up to the step's
                sums += loss_sums.detach()
            losses = (parallel.total(sums) / settings.batch).tolist()  # means over the step's windows
            if not math.isfinite(losses[0]):  # every process sees the same value, so all stop together
                raise UserError(f"distillation diverged at step {step} (loss {losses[0]}); lower lr")
            if sharded:  # FSDP reduce-scattered the sums in the backward
                shards.point_views()
                sharding.clip_grad_norm(list(trained.values()), 1.0)
            else:
                if processes > 1:
                    parallel.sum_gradients(trained.values())
                torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step, optimizer)
            seconds = time.perf_counter() - tick
            seen += settings.batch * length
            record = {"step": step, **dict(zip(("loss", "kl", "local", "stability"), losses)), "tokens": seen,
                      "seconds": seconds, "tokens_per_second": settings.batch * length / seconds, **rates}
            history.append(record)
            if tracker is not None:
                tracker.log({k: v for k, v in record.items() if k != "step"}, step)
            if engine.max_minutes and step == start + 1 and clock.elapsed() > engine.max_minutes * 60:
                raise UserError(f"max_minutes={engine.max_minutes:g} is shorter than one training step "
                                f"({clock.elapsed():.1f} s here); give at least {clock.elapsed() / 60 * 3:.2f}")
            total = _planned(clock, step)
            if progress and parallel.is_main():
                progress(step, total, f"loss {record['loss']:.3f} | kl {record['kl']:.3f} | "
                                      f"{seen:,} tokens | {record['tokens_per_second']:,.0f} tok/s")
            due = (step % settings.checkpoint_every == 0 if settings.checkpoint_every
                   else time.perf_counter() - saved >= CHECKPOINT_SECONDS)
            if sharded:  # every process writes its shard, so all must take process 0's decision
                due = parallel.agree(due)
            if checkpoint_dir is not None and due and (sharded or parallel.is_main()):
                checkpoint.save(checkpoint_dir, trained, optimizer, step, seconds_before + clock.elapsed(), layout)
                saved = time.perf_counter()
    finally:
        uncompile_blocks(student)
    if sharded:
        shards.gather()
    if history:
        history[-1].update(stopped_by_time=float(clock.shortened), processes=float(processes), sharded=float(sharded))
        if str(device).startswith("cuda"):  # this process's peak so far (not reset here: the callers' stage
            # and benchmark peaks span every phase), the others' alike
            history[-1]["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated(device))
    return history


def _planned(clock: Clock, step: int) -> int:
    """The steps the schedule runs to, process 0's under a launcher: each process's clock would
    shorten the run at its own moment, and a process that stops early leaves the others waiting
    in a collective (and a different count would give them different learning rates)."""
    clock.steps = parallel.agree(clock.planned(step))
    return clock.steps


def _optimizer(params: dict[str, nn.Parameter], settings: DistillSettings, lr_factor, fused: bool):
    """AdamW (fused on CUDA) or Adafactor, one parameter group per learning-rate factor."""
    factors: dict[float, list[nn.Parameter]] = {}
    for name, param in params.items():
        factors.setdefault(lr_factor(name) if lr_factor else 1.0, []).append(param)
    groups = [{"params": group, "lr": settings.lr * factor, "base_lr": settings.lr * factor}
              for factor, group in factors.items()]
    if settings.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=settings.lr, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0, fused=fused)


class DistillPair(nn.Module):
    """The student and the frozen teacher as one module whose forward is a micro-batch's loss: the
    sums over its windows of (loss, kl, local, stability), (4,) float32, the first differentiable.
    One module, so that a sharded run (sharding.py) computes the loss inside its root unit's
    forward, where the output matrices are whole."""

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: DistillSettings, dtype: torch.dtype,
                 engine: Engine, device: str):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.settings, self.dtype, self.engine, self.device = settings, dtype, engine, device

    def with_models(self, student: nn.Module, teacher: nn.Module) -> "DistillPair":
        return DistillPair(student, teacher, self.settings, self.dtype, self.engine, self.device)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.engine.autocast(self.device):
            target = self.teacher.base_model(input_ids=batch, output_hidden_states=True, use_cache=False)
        with self.engine.autocast(self.device):
            out = self.student.base_model(input_ids=batch, output_hidden_states=True, use_cache=False)
        kl = _kl_sum(self.student, self.teacher, out, target, self.dtype)
        if self.settings.match_blocks:
            local, stability = (loss.sum() for loss in window_block_losses(target.hidden_states, out.hidden_states))
        else:  # KL alone (another teacher's blocks do not compare with the student's: training/teacher.py)
            local = stability = torch.zeros((), device=kl.device)
        loss = kl + self.settings.local_weight * local + self.settings.stability_weight * stability
        return torch.stack([loss, kl, local, stability])


def run_summary(history: list[dict[str, float]], steps_asked: int | None = None) -> dict[str, float]:
    """What a training run did, for the compress summary: the step it ended at and the tokens seen
    by then (a resumed run counts the steps its checkpoint held, and says at which step it
    resumed), this process's seconds and mean tokens/s (the first step, which compiles, left out
    when there are more), final loss and KL, whether the time budget stopped it, the processes and
    how they split the work ("fsdp": sharded, "ddp": replicated, "none": one process), and on CUDA
    this process's peak GPU memory by the loop's end (since whoever last reset CUDA's peak)."""
    if not history:
        return {"steps": 0, "tokens": 0}
    timed = history[1:] or history
    tokens = sum(h["tokens_per_second"] * h["seconds"] for h in timed)
    resumed = int(history[0]["step"]) - 1
    return {"steps": int(history[-1]["step"]), **({"steps_asked": steps_asked} if steps_asked else {}),
            **({"resumed_at_step": resumed} if resumed > 0 else {}),
            "tokens": int(history[-1]["tokens"]), "seconds": round(sum(h["seconds"] for h in history), 2),
            "tokens_per_second": round(tokens / max(sum(h["seconds"] for h in timed), 1e-9), 1),
            "final_loss": round(history[-1]["loss"], 5), "final_kl": round(history[-1]["kl"], 5),
            "stopped_by_time": bool(history[-1].get("stopped_by_time", 0.0)),
            "processes": int(history[-1].get("processes", 1)),
            "sharding": "fsdp" if history[-1].get("sharded") else "ddp" if history[-1].get("processes", 1) > 1 else "none",
            **({"peak_gpu_bytes": int(history[-1]["peak_gpu_bytes"])} if "peak_gpu_bytes" in history[-1] else {})}
