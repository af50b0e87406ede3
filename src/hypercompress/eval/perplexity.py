"""Perplexity, KL(teacher || student) and top-1 agreement over the same token windows.

Protocol (docs/DESIGN): the text is tokenized once without special tokens and cut into
non-overlapping windows of seq_len tokens; each window is one forward pass with no context from the
previous one; every position but the last predicts the next token, so a window contributes
seq_len - 1 predictions. perplexity = exp(mean NLL over all predictions).
KL and top-1 compare the student's next-token distribution with the teacher's at the same positions:
KL = mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), top-1 = share of positions
where both argmaxes agree.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()))
    return tensor.device


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch.to(_device(model)), use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def teacher_log_probs(teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4):
    """The teacher's log-probabilities per batch, to reuse across many students (list of
    (batch, seq_len - 1, vocab) float32 tensors; about 100 MB per 512-token window of a 49k vocab)."""
    return [_log_probs(teacher, windows[s: s + batch_size])
            for s in range(0, windows.shape[0], batch_size)]


@torch.inference_mode()
def evaluate_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                     teacher: nn.Module | Sequence[torch.Tensor] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """windows: (N, seq_len) token ids -> ppl, nll, kl, top1, tokens, windows, tokens_per_s.

    teacher: a model, or its `teacher_log_probs` for the same windows and batch size.
    """
    nll_sum, kl_sum, agree, predicted, seconds = 0.0, 0.0, 0, 0, 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size]
        tick = time.perf_counter()
        log_p = _log_probs(model, batch)
        seconds += time.perf_counter() - tick
        targets = batch[:, 1:].to(log_p.device)
        nll_sum += -log_p.gather(-1, targets[..., None]).double().sum().item()
        predicted += targets.numel()
        if teacher is not None:
            log_t = (teacher[start // batch_size] if isinstance(teacher, Sequence)
                     else _log_probs(teacher, batch))
            log_t = log_t.to(log_p.device)
            kl_sum += (log_t.exp() * (log_t - log_p)).sum(-1).double().sum().item()
            agree += (log_t.argmax(-1) == log_p.argmax(-1)).sum().item()
        if progress:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    nll = nll_sum / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "kl": kl_sum / predicted if teacher is not None else None,
        "top1": agree / predicted if teacher is not None else None,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens": int(windows.numel()),
        "predicted_tokens": predicted,
        "tokens_per_s": windows.numel() / seconds if seconds else None,
    }


def protocol_text(data: str, seq_len: int, used: int, available: int, dtype: torch.dtype,
                  teacher: str | None, device: str = "cpu") -> str:
    """The one-line protocol printed next to every number."""
    dtype_name = str(dtype).removeprefix("torch.")
    line = (f"{data}: whole text tokenized once (no special tokens), first {used} of {available} "
            f"non-overlapping windows of {seq_len} tokens, {seq_len - 1} predictions per window, "
            f"ppl = exp(mean NLL), {dtype_name} compute on {device}")
    if teacher:
        line += f"; KL(teacher || student) and top-1 agreement vs {teacher} on the same windows"
    return line
