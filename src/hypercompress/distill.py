"""Distillation against a frozen teacher: the training loop shared by every trained representation.

Loss per step on a batch of calibration windows (B, T):
    KL(teacher || student) of the next-token distributions, mean over B x T positions (the task loss)
  + local_weight * mean_l ||h_s^l - h_t^l||^2 / mean((h_t^l)^2)       (per-block output matching)
  + stability_weight * mean_l (log(rms(h_s^l) / rms(h_t^l)))^2         (generated blocks keep scale)
h^l are the block outputs (hidden_states[1:]). The student's trainable tensors are produced by
`refresh()` before every forward (a hypernetwork regenerating the weights, with autograd).
AdamW with cosine decay to 10% of lr, gradient-norm clipping at 1.0; windows drawn by a generator
seeded with (seed, step), so a resumed run sees the same batches. Checkpoints (safetensors + JSON,
never pickles) hold the trainable tensors and AdamW's moments. Under a launcher (parallel.py) each
process takes its share of every batch and the gradients are averaged before the step.
Every step's loss, kl, local, stability, tokens_per_second and learning rate go to the caller's
tracking.Tracker (TensorBoard / W&B) under its prefix ("distill", "qat", "hypernet").
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .errors import UserError
from .tracking import Tracker, learning_rates

# progress(step, total_steps, note) -- note: "loss 1.23 | kl 0.98 | 4,100 tok/s"
TrainProgress = Callable[[int, int, str], None]


@dataclass
class DistillSettings:
    steps: int
    batch: int
    lr: float
    local_weight: float = 0.1
    stability_weight: float = 0.01
    seed: int = 0
    checkpoint_every: int = 50
    optimizer: str = "adamw"   # or "adafactor" (factored second moments: low memory, Shazeer & Stern 2018)


def train_norms(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Every norm's weight made trainable and registered in `params` by name (stored as float16
    anyway, so training them costs no bytes)."""
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.requires_grad_(True)
            params[f"{name}.weight"] = module.weight


def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student): logits (..., V) -> scalar."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def block_losses(teacher_hidden, student_hidden) -> tuple[torch.Tensor, torch.Tensor]:
    """(local matching, activation stability) over block outputs hidden_states[1:]; a student with
    fewer blocks (depth-pruned) is matched on the final hidden state only."""
    local, stability = [], []
    pairs = zip(teacher_hidden[1:], student_hidden[1:]) if len(teacher_hidden) == len(student_hidden) \
        else [(teacher_hidden[-1], student_hidden[-1])]
    for t, s in pairs:
        t, s = t.float(), s.float()
        power = t.pow(2).mean()
        local.append((s - t).pow(2).mean() / power.clamp_min(1e-12))
        stability.append(torch.log(s.pow(2).mean().clamp_min(1e-12).sqrt() / power.clamp_min(1e-12).sqrt()) ** 2)
    return torch.stack(local).mean(), torch.stack(stability).mean()


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, params: dict[str, nn.Parameter],
            refresh: Callable[[], None], settings: DistillSettings, device: str = "cpu",
            checkpoint_dir: Path | None = None, resume: bool = False,
            progress: TrainProgress | None = None,
            after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
            lr_factor: Callable[[str], float] | None = None,
            tracker: Tracker | None = None) -> list[dict[str, float]]:
    """Train `params` (by name) so that `student` matches `teacher` on `windows` (N, T) token ids.

    Returns the history: one dict per step (loss, kl, local, stability, tokens_per_second, lr: the
    first parameter group's learning rate of that step); each also goes to `tracker` when given.
    `after_step(step, optimizer)` runs after every update (ReLoRA merges); `lr_factor(name)`
    scales the learning rate of one trained tensor (default 1 for all).
    """
    factors: dict[float, list[nn.Parameter]] = {}
    for name, param in params.items():
        factors.setdefault(lr_factor(name) if lr_factor else 1.0, []).append(param)
    groups = [{"params": group, "lr": settings.lr * factor} for factor, group in factors.items()]
    if settings.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=settings.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(settings.steps, 1), 1))))
    processes, rank = parallel.world(), parallel.rank()
    if settings.batch % processes:
        raise UserError(f"batch {settings.batch} does not split over {processes} processes; "
                        f"use a multiple of {processes}")
    start = 0
    if checkpoint_dir is not None and resume:
        start = _restore(checkpoint_dir, params, optimizer, schedule)
    history: list[dict[str, float]] = []
    teacher.eval()
    for step in range(start, settings.steps):
        tick = time.perf_counter()
        picks = torch.randint(0, windows.shape[0], (settings.batch,),
                              generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + step))
        batch = windows[picks[rank::processes]].to(device)  # this process's share
        with torch.no_grad():
            target = teacher(input_ids=batch, output_hidden_states=True, use_cache=False)
        refresh()
        out = student(input_ids=batch, output_hidden_states=True, use_cache=False)
        kl = kl_to_teacher(target.logits[:, :-1], out.logits[:, :-1])
        local, stability = block_losses(target.hidden_states, out.hidden_states)
        loss = kl + settings.local_weight * local + settings.stability_weight * stability
        losses = parallel.mean(torch.stack([loss, kl, local, stability]).detach()).tolist()  # all processes'
        if not math.isfinite(losses[0]):  # every process sees the same mean, so all stop together
            raise UserError(f"distillation diverged at step {step} (loss {losses[0]}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        rates = learning_rates(optimizer)  # this step's, before the schedule moves on
        loss.backward()
        if processes > 1:
            parallel.average_gradients(params.values())
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step + 1, optimizer)
        seconds = time.perf_counter() - tick
        record = {"step": step + 1, **dict(zip(("loss", "kl", "local", "stability"), losses)),
                  "tokens_per_second": batch.numel() * processes / seconds, **rates}
        history.append(record)
        if tracker is not None:
            tracker.log({k: v for k, v in record.items() if k != "step"}, step + 1)
        if progress and parallel.is_main():
            progress(step + 1, settings.steps, f"loss {record['loss']:.3f} | kl {record['kl']:.3f} | "
                                               f"{record['tokens_per_second']:,.0f} tok/s")
        if checkpoint_dir is not None and (step + 1) % settings.checkpoint_every == 0 and parallel.is_main():
            _save(checkpoint_dir, params, optimizer, step + 1)
    return history


def _save(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, step: int) -> None:
    """Trainable tensors and every tensor of the optimizer's state (AdamW moments, Adafactor's
    factored ones), with the step in the header, as a new safetensors file; then state.json, naming
    it with its size and sha256, replaces the old one (one atomic rename: at every instant it
    describes a complete file); then the older file is deleted."""
    import secrets

    from .artifact_reader import file_sha256
    from .checkpoint import remove_stale, save_json, save_tensors

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu() for n, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and key != "step":
                tensors[f"state.{key}.{name}"] = value.detach().cpu()
    file = f"distill-{step}-{secrets.token_hex(4)}.safetensors"
    save_tensors(directory / file, tensors, {"step": str(step)})
    save_json(directory / STATE, {"file": file, "bytes": (directory / file).stat().st_size,
                                  "sha256": file_sha256(directory / file), "step": step})
    remove_stale(directory, "distill*.safetensors", file)


STATE = "state.json"  # {"file", "bytes", "sha256", "step"}: the checkpoint's tensors file, verified
LEGACY = "distill.safetensors"  # what earlier versions wrote, with no digest: refused


def _restore(directory: Path, params, optimizer, schedule) -> int:
    """The step of the checkpoint in `directory` (0 without one), its tensors restored. Raises
    UserError when the file cannot be read, does not hash to the recorded sha256 or does not fit
    `params`."""
    from .checkpoint import _is_index, check_sha256, read_json, read_tensors, tensor_index, unreadable, valid_file_name

    if not (directory / STATE).exists():
        if (directory / LEGACY).exists():  # an earlier version's checkpoint: no digest to verify
            check_sha256(directory / LEGACY, directory, None)
        return 0  # none saved yet (a tensors file without a state.json is a killed save's orphan)
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
    with warnings.catch_warnings():  # the schedule is wound forward before any optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        for _ in range(step):
            schedule.step()
    return step


def teacher_samples(teacher: nn.Module, prompts: torch.Tensor, length: int, seed: int = 0,
                    prompt_tokens: int = 8) -> torch.Tensor:
    """Training windows written by the teacher: each row of `prompts` (N, T) gives its first
    `prompt_tokens` tokens, the teacher samples the rest (temperature 1, no truncation) up to
    `length`; seeded. (N, length) token ids. Data that is the teacher's own distribution, not the
    calibration text's, guards against fitting one domain."""
    torch.manual_seed(seed)
    device = next(teacher.parameters()).device
    with torch.no_grad():
        out = teacher.generate(prompts[:, :prompt_tokens].to(device), do_sample=True, top_k=0, top_p=1.0,
                               temperature=1.0, max_new_tokens=length - prompt_tokens,
                               min_new_tokens=length - prompt_tokens, pad_token_id=0)
    return out[:, :length].cpu()
