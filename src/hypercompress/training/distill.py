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
            refresh: Callable[[], None], settings: DistillSettings, device: str = "cpu",
            checkpoint_dir: Path | None = None, resume: bool = False,
            progress: TrainProgress | None = None,
            after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
            lr_factor: Callable[[str], float] | None = None,
            tracker: Tracker | None = None, mix: tuple[int, float] | None = None) -> list[dict[str, float]]:
    """Train `params` (by name) so that `student` matches `teacher` on `windows` (N, T) token ids.
    `mix` = (n, share): the first n windows are calibration text, the rest teacher-written, and each
    window of a step is a written one with probability `share` (corpus.mixed_picks); else all
    windows are drawn alike.

    Returns the history: one dict per step (loss, kl, local, stability, tokens (seen so far),
    tokens_per_second, lr: the first parameter group's learning rate of that step); each also goes
    to `tracker` when given. The run's length: settings.steps, or settings.engine's token budget,
    cut short by its time budget (engine.py). `after_step(step, optimizer)` runs after every update
    (ReLoRA merges); `lr_factor(name)` scales the learning rate of one trained tensor (default 1).
    """
    engine = settings.engine
    engine.validate(settings.batch)
    length = windows.shape[1]
    steps = engine.steps(settings.steps, settings.batch * length)
    factors: dict[float, list[nn.Parameter]] = {}
    for name, param in params.items():
        factors.setdefault(lr_factor(name) if lr_factor else 1.0, []).append(param)
    groups = [{"params": group, "lr": settings.lr * factor, "base_lr": settings.lr * factor}
              for factor, group in factors.items()]
    if settings.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=settings.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0,
                                      fused=str(device).startswith("cuda"))
    processes, rank = parallel.world(), parallel.rank()
    micro = engine.micro_batch or max(settings.batch // processes, 1)  # the same micro_batch: the same steps
    if settings.batch % micro or (settings.batch // micro) % processes:  # on one process and on several
        raise UserError(f"batch {settings.batch} in micro-batches of {micro} does not split over {processes} "
                        f"processes; use a batch of a multiple of {micro * processes}")
    start, seconds_before = 0, 0.0
    if checkpoint_dir is not None and resume:
        start, seconds_before = _restore(checkpoint_dir, params, optimizer)
    history: list[dict[str, float]] = []
    dtype = engine.dtype(device)
    frozen = frozen_teacher(teacher, engine, device)
    compile_blocks(student, engine, device)
    if frozen is not teacher:
        compile_blocks(frozen, engine, device)
    clock = Clock(steps, engine.max_minutes, start)
    seen = start * settings.batch * length
    saved = time.perf_counter()
    try:
        step = start
        while step < clock.planned(step):
            tick = time.perf_counter()
            for group in optimizer.param_groups:  # this step's rate: cosine over the (possibly shortened) run
                group["lr"] = group["base_lr"] * cosine(step / clock.steps)
            rates = learning_rates(optimizer)
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            picks = torch.randint(0, windows.shape[0], (settings.batch,), generator=generator) if mix is None \
                else mixed_picks(settings.batch, mix[0], windows.shape[0] - mix[0], mix[1], generator)
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(4, device=device)
            for chunk in list(picks.split(micro))[rank::processes]:  # this process's micro-batches
                sums += _accumulate(student, frozen, windows[chunk].to(device), refresh, settings, dtype, engine,
                                    device)
            losses = (parallel.total(sums) / settings.batch).tolist()  # means over the step's windows
            if not math.isfinite(losses[0]):  # every process sees the same value, so all stop together
                raise UserError(f"distillation diverged at step {step} (loss {losses[0]}); lower lr")
            if processes > 1:
                parallel.sum_gradients(params.values())
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
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
            total = clock.planned(step)
            if progress and parallel.is_main():
                progress(step, total, f"loss {record['loss']:.3f} | kl {record['kl']:.3f} | "
                                      f"{seen:,} tokens | {record['tokens_per_second']:,.0f} tok/s")
            due = (step % settings.checkpoint_every == 0 if settings.checkpoint_every
                   else time.perf_counter() - saved >= CHECKPOINT_SECONDS)
            if checkpoint_dir is not None and due and parallel.is_main():
                _save(checkpoint_dir, params, optimizer, step, seconds_before + clock.elapsed())
                saved = time.perf_counter()
    finally:
        uncompile_blocks(student)
    if history:
        history[-1]["stopped_by_time"] = float(clock.shortened)
    return history


def run_summary(history: list[dict[str, float]], steps_asked: int | None = None) -> dict[str, float]:
    """What a training run did, for the compress summary: steps, tokens seen, seconds, mean tokens/s
    over the steps (the first, which compiles, left out when there are more), final loss and KL, and
    whether the time budget stopped it."""
    if not history:
        return {"steps": 0, "tokens": 0}
    timed = history[1:] or history
    tokens = sum(h["tokens_per_second"] * h["seconds"] for h in timed)
    return {"steps": len(history), **({"steps_asked": steps_asked} if steps_asked else {}),
            "tokens": int(history[-1]["tokens"]), "seconds": round(sum(h["seconds"] for h in history), 2),
            "tokens_per_second": round(tokens / max(sum(h["seconds"] for h in timed), 1e-9), 1),
            "final_loss": round(history[-1]["loss"], 5), "final_kl": round(history[-1]["kl"], 5),
            "stopped_by_time": bool(history[-1].get("stopped_by_time", 0.0))}


def _accumulate(student, teacher, batch, refresh, settings: DistillSettings, dtype, engine, device) -> torch.Tensor:
    """Forward and backward of one micro-batch (b, T); its loss is summed over its windows and divided
    by the step's batch, so the micro-batches' gradients add up to the step's. Returns the detached
    sums of (loss, kl, local, stability) over its windows."""
    with torch.no_grad(), engine.autocast(device):
        target = teacher.base_model(input_ids=batch, output_hidden_states=True, use_cache=False)
    refresh()
    with engine.autocast(device):
        out = student.base_model(input_ids=batch, output_hidden_states=True, use_cache=False)
    kl = _kl_sum(student, teacher, out, target, dtype)
    if settings.match_blocks:
        local, stability = (loss.sum() for loss in window_block_losses(target.hidden_states, out.hidden_states))
    else:  # KL alone (another teacher's blocks do not compare with the student's: training/teacher.py)
        local = stability = torch.zeros((), device=kl.device)
    loss = kl + settings.local_weight * local + settings.stability_weight * stability
    (loss / settings.batch).backward()
    return torch.stack([loss, kl, local, stability]).detach()


def _save(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, step: int,
          seconds: float = 0.0) -> None:
    """Trainable tensors and every tensor of the optimizer's state (AdamW moments, Adafactor's
    factored ones), with the step in the header, as a new safetensors file; then state.json, naming
    it with its size, sha256 and the training seconds so far, replaces the old one (one atomic rename: at every instant it
    describes a complete file); then the older file is deleted."""
    import secrets

    from ..storage.reader import file_sha256
    from ..storage.checkpoint import remove_stale, save_json, save_tensors

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu() for n, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and key != "step":
                tensors[f"state.{key}.{name}"] = value.detach().cpu()
    file = f"distill-{step}-{secrets.token_hex(4)}.safetensors"
    save_tensors(directory / file, tensors, {"step": str(step)})
    save_json(directory / STATE, {"file": file, "bytes": (directory / file).stat().st_size,
                                  "sha256": file_sha256(directory / file), "step": step,
                                  "seconds": round(float(seconds), 3)})
    remove_stale(directory, "distill*.safetensors", file)


STATE = "state.json"  # {"file", "bytes", "sha256", "step", "seconds"}: the checkpoint's tensors file, verified
LEGACY = "distill.safetensors"  # what earlier versions wrote, with no digest: refused


def _restore(directory: Path, params, optimizer) -> tuple[int, float]:
    """(the step of the checkpoint in `directory`, its training seconds) ((0, 0) without one), its
    tensors restored. Raises
    UserError when the file cannot be read, does not hash to the recorded sha256 or does not fit
    `params`."""
    from ..storage.checkpoint import _is_index, check_sha256, read_json, read_tensors, tensor_index, unreadable, valid_file_name

    if not (directory / STATE).exists():
        if (directory / LEGACY).exists():  # an earlier version's checkpoint: no digest to verify
            check_sha256(directory / LEGACY, directory, None)
        return 0, 0.0  # none saved yet (a tensors file without a state.json is a killed save's orphan)
    state = read_json(directory / STATE, directory)
    file, size, step = state.get("file"), state.get("bytes"), state.get("step")
    if not (valid_file_name(file) and _is_index(size) and _is_index(step)):
        raise unreadable(directory, f"{STATE} lacks a valid file, bytes or step entry")
    path = directory / file
    index = tensor_index(path, directory, size)
    for name, p in params.items():
        if index.get(f"param.{name}") != (tuple(p.shape), p.dtype):
            raise unreadable(directory, f"it does not hold the trained tensor '{name}' of this shape")
    for key, (shape, _) in index.items():
        kind, _, rest = key.partition(".")
        name = rest.partition(".")[2] if kind == "state" else rest
        if kind not in ("param", "state") or name not in params or (
                isinstance(optimizer, torch.optim.AdamW) and shape != tuple(params[name].shape)):
            raise unreadable(directory, f"it holds a tensor '{key}' this run does not train")
    check_sha256(path, directory, state.get("sha256"))  # before any tensor is read
    tensors = read_tensors(path, directory, sorted(index))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            state = {k.split(".", 2)[1]: v.to(p.device) for k, v in tensors.items()
                     if k.startswith("state.") and k.split(".", 2)[2] == name}
            if state:
                optimizer.state[p] = {"step": torch.tensor(float(step)), **state}
    seconds = state.get("seconds", 0.0)
    return step, float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else 0.0
