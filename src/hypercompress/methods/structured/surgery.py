"""Structural surgery: remove blocks, MLP channels and key/value head groups, so the model really
gets smaller (fewer parameters, fewer FLOPs) and its config describes the new shapes (an artifact of
it reloads through the ordinary Hugging Face constructor).

Every block keeps the same number of channels and groups (the config holds one intermediate size and
one head count); which ones are kept is chosen per block.
"""

from __future__ import annotations

import torch
from torch import nn

from ...arch import arch_of
from ...layers.base import CompressedModule
from ...modules import replace_module

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def slice_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
                 ) -> nn.Module:
    """A Linear / Conv1D keeping output features `rows` and input features `cols` (index tensors)."""
    conv = Conv1D is not None and isinstance(module, Conv1D)
    weight = module.weight.detach()
    weight = weight.t() if conv else weight                                   # (out, in)
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = module.bias
    if bias is not None and rows is not None:
        bias = bias.detach()[rows]
    out_features, in_features = weight.shape
    if conv:
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None)
        new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return new.to(module.weight.dtype)


def drop_blocks(model: nn.Module, drop: list[int]) -> None:
    """Remove blocks `drop`; renumber the attention layers' cache indices; update the config."""
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    replace_module(model, spec.blocks, nn.ModuleList(kept))
    for index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list):
        model.config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(drop)]
    setattr(model.config, spec.layers_key, len(kept))


def keep_channels(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep MLP channels keep[l] (sorted indices, the same count in every block)."""
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    for block, index in zip(blocks, keep):
        for name in spec.mlp_up:
            replace_module(block, name, slice_linear(block.get_submodule(name), rows=index))
        if spec.mlp_gate_up:  # rows [gate; up]: the channel's gate row and its up row
            inner = getattr(model.config, spec.intermediate_key)
            replace_module(block, spec.mlp_gate_up, slice_linear(block.get_submodule(spec.mlp_gate_up),
                                                                 rows=torch.cat([index, index + inner])))
        replace_module(block, spec.mlp_down, slice_linear(block.get_submodule(spec.mlp_down), cols=index))
    setattr(model.config, spec.intermediate_key, int(keep[0].numel()))


def keep_groups(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep key/value groups keep[l] (sorted, the same count in every block): their KV heads and the
    query heads that read them; head_dim is written into the config so it no longer derives from
    hidden_size / heads."""
    spec = arch_of(model.config.model_type)
    config = model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // groups
    q_name, k_name, v_name, o_name = spec.attention
    blocks = model.get_submodule(spec.blocks)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for block, index in zip(blocks, keep):
        q_heads = (index[:, None] * per_group + torch.arange(per_group)).reshape(-1)
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        kv_rows = (index[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        replace_module(block, q_name, slice_linear(block.get_submodule(q_name), rows=q_rows))
        replace_module(block, k_name, slice_linear(block.get_submodule(k_name), rows=kv_rows))
        replace_module(block, v_name, slice_linear(block.get_submodule(v_name), rows=kv_rows))
        replace_module(block, o_name, slice_linear(block.get_submodule(o_name), cols=q_rows))
    config.head_dim = head_dim
    config.num_key_value_heads = int(keep[0].numel())
    config.num_attention_heads = int(keep[0].numel()) * per_group


def flops_per_token(model: nn.Module, context: int = 512) -> int:
    """2 x multiply-adds per token at `context`: every matmul of the blocks and the lm_head (a
    compressed module's own count, `CompressedModule.macs`: low-rank factors cost r (in + out)),
    plus attention scores and their weighted sum (2 x 2 x heads x head_dim x context / 2 on average
    over a causal window)."""
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    head = model.get_output_embeddings()
    linear = sum(_macs(m) for b in blocks for m in _matmuls(b)) + (_macs(head) if head is not None else 0)
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * linear + 2 * len(blocks) * heads * head_dim * context


def _matmuls(block: nn.Module):
    """The outermost compressed modules and dense linears of a block (an adapter's base is its own)."""
    inside: list[str] = []
    for name, module in block.named_modules():
        if any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if isinstance(module, CompressedModule):
            inside.append(name)
            yield module
        elif isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
            yield module


def _macs(module: nn.Module) -> int:
    if isinstance(module, CompressedModule):
        return module.macs()
    return module.weight.numel() if hasattr(module, "weight") else 0
