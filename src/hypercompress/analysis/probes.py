"""Where a concept lives: pooled residual activations per layer, linear probes, difference of means.

Each example (one line of text) is run alone through the model; its residual vectors at every layer
(the embedding output, the input of each block, and the final normed state: HF's `hidden_states`)
are averaged over its tokens, giving features (layers + 1, examples, hidden). A linear probe is a
logistic regression on standardised features (scikit-learn), trained on the fit split and scored on
examples it never saw (Alain & Bengio 2016, "Understanding intermediate layers using linear
classifier probes"); the difference of class means (Rimsky et al. 2023, Arditi et al. 2024) gives
the concept's direction and, divided by the pooled spread along it, its separation (Cohen's d).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def pad_right(lines: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token-id tensors -> (ids, mask), both (len(lines), longest) long, zero-padded on the right."""
    longest = max(ids.numel() for ids in lines)
    ids = torch.zeros(len(lines), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, line in enumerate(lines):
        ids[row, :line.numel()], mask[row, :line.numel()] = line, 1
    return ids, mask


@torch.inference_mode()
def pooled_residuals(model: nn.Module, examples: list[torch.Tensor], device: str = "cpu",
                     batch_size: int = 16, observe: Callable | None = None) -> torch.Tensor:
    """Mean over tokens of every layer's residual: (layers + 1, len(examples), hidden) float32.

    examples: 1-D token-id tensors (length >= 2), padded on the right within a batch (masked out).
    The first position is left out of the mean and of `observe`'s mask: in most LLMs it is an
    attention sink whose residual is orders of magnitude larger than the others' (SmolLM2-135M: one
    channel near 25000 from block 12 on; Xiao et al. 2023, Sun et al. 2024 "Massive activations"),
    and an erasure fitted on it is dominated by those channels.
    observe(states (layers + 1, batch, T, hidden), mask (batch, T) bool, rows: the examples' indices)
    sees every batch's token-level residuals (to stream statistics without keeping them)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].numel())
    pooled: list[torch.Tensor | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        ids, mask = pad_right([examples[i] for i in chosen])
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False)
        mask = mask.clone()
        mask[:, 0] = 0  # the first position: an attention sink, its residual orders of magnitude larger
        weights = mask.to(device).float()[None, :, :, None]  # (1, batch, T, 1)
        states = torch.stack(out.hidden_states).float()        # (layers + 1, batch, T, hidden)
        means = (states * weights).sum(2) / weights.sum(2).clamp_min(1)
        if observe is not None:
            observe(states, mask.to(device).bool(), chosen)
        for row, i in enumerate(chosen):
            pooled[i] = means[:, row].cpu()
    return torch.stack(pooled, dim=1)


@torch.inference_mode()
def massive_channels(model: nn.Module, ids: torch.Tensor, ratio: float = 10.0, device: str = "cpu") -> list[int]:
    """Residual channels holding massive activations (Sun et al. 2024): at some layer, the channel's
    largest |value| over the tokens of `ids` (1, T) exceeds `ratio` times the median over channels of
    that maximum. They act as the model's fixed biases (attention sinks); an erasure must not move them."""
    states = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False).hidden_states[:-1]
    found: set[int] = set()
    for state in states:
        peak = state[0].float().abs().amax(0)
        found.update(torch.nonzero(peak > ratio * peak.median()).flatten().tolist())
    return sorted(found)


def probe_accuracy(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (standardised features, L2, C = 1).
    x_*: (N, hidden), y_*: (N,) of 0/1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    probe.fit(x_fit.double().numpy(), y_fit.numpy())
    return float(probe.score(x_test.double().numpy(), y_test.numpy()))


def cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int = 3, seed: int = 0) -> float:
    """Mean accuracy of the probe over `folds` stratified folds of (x, y): chooses layers without
    touching the held-out split."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = [probe_accuracy(x[train], y[train], x[test], y[test], seed)
              for train, test in splitter.split(x.numpy(), y.numpy())]
    return sum(scores) / len(scores)


def separation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cohen's d of the two classes along their difference of means. x: (N, hidden), y: (N,) 0/1."""
    x = x.double()
    direction = x[y == 1].mean(0) - x[y == 0].mean(0)
    norm = float(direction.norm())
    if norm == 0:
        return 0.0
    along = x @ (direction / norm)
    spread = math.sqrt((float(along[y == 1].var()) + float(along[y == 0].var())) / 2)
    return float(along[y == 1].mean() - along[y == 0].mean()) / spread if spread > 0 else math.inf


def chance_bound(y_test: torch.Tensor) -> tuple[float, float]:
    """(chance, bound): the majority-class share of the held-out labels, and that plus two standard
    errors of an accuracy measured on len(y_test) examples: a probe at or below the bound is at chance."""
    share = float(y_test.double().mean())
    chance = max(share, 1 - share)
    return chance, chance + 2 * math.sqrt(chance * (1 - chance) / y_test.numel())
