"""Importance of blocks, MLP channels and attention head groups, measured on calibration text.

One forward pass over the calibration windows with hooks collects all three:
- block influence (ShortGPT, Men et al. 2024): BI_l = 1 - E_tokens cos(h_l, h_{l+1}), the block's
  input and output hidden states; a block that barely turns the residual stream is removable;
- MLP channel importance (activation x weight, as in Wanda / Minitron, Sun et al. 2023, Muralidharan
  et al. 2024): s_j = ||X_j||_2 * ||W_down[:, j]||_2, X_j the channel's activations over all tokens;
- head-group importance: for each query head h the same score on its slice of the o_proj input,
  s_h = ||X_h||_F * ||W_o[:, h]||_F; a key/value group (one KV head and the query heads that read it,
  so grouped-query attention stays consistent) scores the sum over its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...arch import ArchSpec, arch_of
from ...layers.base import linear_weight


@dataclass
class Importance:
    blocks: torch.Tensor            # (L,) block influence
    channels: list[torch.Tensor]    # per block (I,) MLP channel scores
    groups: list[torch.Tensor]      # per block (G,) key/value group scores ([] without attention spec)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def measure(model: nn.Module, calib: torch.Tensor, batch: int = 4) -> Importance:
    """Run `calib` (N, T) token windows through `model` once (on the device the model and `calib`
    are on); the scores of every block, channel and head group, on the CPU. The model is left unchanged."""
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    n = len(blocks)
    influence, tokens = torch.zeros(n, dtype=torch.float64), 0
    channel_sq: list[torch.Tensor | float] = [0.0] * n
    head_sq: list[torch.Tensor | float] = [0.0] * n
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            inputs[i] = _hidden(args, kwargs)

        def post(module, args, kwargs, out, i=i):
            x, y = inputs.pop(i).float(), _output(out).float()
            influence[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).double().sum().item()

        def down(module, args, i=i):
            channel_sq[i] = channel_sq[i] + args[0].float().pow(2).reshape(-1, args[0].shape[-1]).sum(0)

        hooks += [block.register_forward_pre_hook(pre, with_kwargs=True),
                  block.register_forward_hook(post, with_kwargs=True)]
        if spec.mlp_down:  # (a mixture of experts has no MLP channels of its own)
            hooks.append(block.get_submodule(spec.mlp_down).register_forward_pre_hook(down))
        if spec.attention is not None:
            def o_in(module, args, i=i):
                head_sq[i] = head_sq[i] + args[0].float().pow(2).reshape(-1, args[0].shape[-1]).sum(0)

            hooks.append(block.get_submodule(spec.attention[3]).register_forward_pre_hook(o_in))
    try:
        for start in range(0, calib.shape[0], batch):
            ids = calib[start: start + batch]
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
    channels = [(channel_sq[i].sqrt() * linear_weight(blocks[i].get_submodule(spec.mlp_down)).norm(dim=0)).cpu()
                for i in range(n)] if spec.mlp_down else []
    groups = [] if spec.attention is None else [_group_scores(model, spec, blocks[i], head_sq[i]).cpu()
                                                for i in range(n)]
    return Importance(influence.float() / tokens, channels, groups)


def _group_scores(model: nn.Module, spec: ArchSpec, block: nn.Module, head_sq: torch.Tensor) -> torch.Tensor:
    """(G,) key/value group scores from the per-column squared o_proj inputs (H * d,)."""
    heads, groups = model.config.num_attention_heads, model.config.num_key_value_heads
    weight = linear_weight(block.get_submodule(spec.attention[3]))        # (D, H d)
    d = weight.shape[1] // heads
    per_head = head_sq.reshape(heads, d).sum(1).sqrt() * weight.reshape(-1, heads, d).pow(2).sum((0, 2)).sqrt()
    return per_head.reshape(groups, heads // groups).sum(1)
