"""Information flow and importance on calibration text: block influence, the logit lens, Fisher.

- block influence (ShortGPT, Men et al. 2024, arXiv:2403.03853): BI_i = 1 - E_t[cos(h_i, h_{i+1})],
  h_i the residual stream entering block i; a block that barely turns the stream matters little.
- logit lens (nostalgebraist 2020): the next-token loss when the final norm and the head read the
  residual stream after each block, as if the model stopped there.
- Fisher importance: the empirical diagonal Fisher information of each linear's weights,
  sum over tokens-batches of (dL/dW)^2 (Kirkpatrick et al. 2017, EWC), summed per module and per weight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.base import CompressedModule


@torch.no_grad()
def block_flow(model: nn.Module, samples: torch.Tensor, batch_size: int = 2, device: str = "cpu") -> list[dict]:
    """[{block, influence, lens_nll}] per block; samples (N, T) token ids. lens_nll of the last
    block is the model's own loss. Needs a model whose backbone has a final `norm` (Llama, Qwen,
    Mistral...) or `ln_f` (GPT-2)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    norm = getattr(backbone, "norm", None) or getattr(backbone, "ln_f", None)
    head = model.get_output_embeddings()
    model.to(device)
    cos_sum, nll_sum, tokens = None, None, 0
    for chunk in samples.split(batch_size):
        ids = chunk.to(device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, after each block
        cos = torch.stack([F.cosine_similarity(a.float(), b.float(), dim=-1).sum() for a, b in
                           zip(hidden[:-2], hidden[1:-1])] + [torch.tensor(float("nan"), device=ids.device)])
        # the last hidden state is already normed by HF; the ones before get the final norm here
        states = [norm(h) if norm is not None else h for h in hidden[1:-1]] + [hidden[-1]]
        nll = torch.stack([F.cross_entropy(head(s[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten(),
                                           reduction="sum") for s in states])
        cos_sum = cos if cos_sum is None else cos_sum + cos
        nll_sum = nll if nll_sum is None else nll_sum + nll
        tokens += ids.numel()
    predictions = samples.shape[0] * (samples.shape[1] - 1)
    blocks = len(nll_sum)
    influence = (1 - cos_sum / tokens).tolist()  # the last block's output is only seen normed: nan
    return [{"block": i, "influence": influence[i], "lens_nll": float(nll_sum[i]) / predictions} for i in range(blocks)]


def fisher_importance(model: nn.Module, samples: torch.Tensor, batch_size: int = 2, device: str = "cpu",
                      progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """{linear name: {"fisher": sum of squared gradients of the next-token loss (nats), "per_weight":
    that / weights}} for every nn.Linear (stored kinds are not differentiated here)."""
    model.to(device)
    names = {id(m.weight): n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, CompressedModule)}
    params = [p for p in model.parameters() if id(p) in names]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in names)
    totals = {id(p): torch.zeros((), dtype=torch.float64) for p in params}
    chunks = list(samples.split(batch_size))
    try:
        for done, chunk in enumerate(chunks):
            ids = chunk.to(device)
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                totals[id(p)] += float((g.double() ** 2).sum())
            if progress:
                progress(done + 1, len(chunks))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {names[id(p)]: {"fisher": float(totals[id(p)]), "per_weight": float(totals[id(p)]) / p.numel()}
            for p in params}
