"""Turning a loaded artifact back into a plain transformers model (dense weights, no custom modules).

Every compressed module is replaced by the nn.Linear / nn.Embedding (GPT-2: Conv1D) of the weight it
represents (`dense_weight`), a tied head is tied again to the dense embedding, and modules that live
only in hypercompress (a hypernetwork generator at the root, latent-KV attention forwards) are
removed, so `save_pretrained` writes what any tool loads. The weights are exactly those the artifact
computes with, rounded once to the export dtype.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..experts import fuse_experts
from ..layers.base import CompressedModule, Conv1D, StoredModule
from ..modules import first_non_finite


def _dense_linear(module: CompressedModule, was_conv1d: bool, dtype: torch.dtype) -> nn.Module:
    weight = module.dense_weight(torch.float32)
    bias = getattr(module, "bias", None)
    if was_conv1d:
        layer = Conv1D(weight.shape[0], weight.shape[1])
        layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def densify(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """In place: every compressed module -> its dense equivalent in `dtype`; returns the model.

    Linears that were Conv1D in the architecture (GPT-2) become Conv1D again. A TiedHead becomes
    the output embedding tied to the (dense) input embedding, as `config.tie_word_embeddings` says.
    """
    from ..arch import arch_of

    conv1d = arch_of(model.config.model_type).conv1d
    stored = [(n, m) for n, m in model.named_modules() if isinstance(m, StoredModule)]
    outer = [(n, m) for n, m in stored if not any(n.startswith(f"{o}.") for o, _ in stored)]
    tied_heads = []
    for name, module in outer:
        if module.kind == "tied_head":
            tied_heads.append(name)
        elif module.kind in ("quant_embedding", "low_rank_embedding"):
            weight = module.dense_weight(torch.float32)
            embedding = nn.Embedding(weight.shape[0], weight.shape[1])
            embedding.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            _set(model, name, embedding)
        elif isinstance(module, CompressedModule) and hasattr(module, "in_features"):
            _set(model, name, _dense_linear(module, conv1d and name != "lm_head", dtype))
        else:  # the generator (its layers were generated at load): nothing of it remains
            parent, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, leaf)
    for name in tied_heads:
        embedding = model.get_input_embeddings()
        head = nn.Linear(embedding.weight.shape[1], embedding.weight.shape[0], bias=False)
        head.weight = embedding.weight
        _set(model, name, head)
    for module in model.modules():  # latent-KV attention: back to the class's own forward
        if isinstance(getattr(module, "forward", None), types.MethodType) and "forward" in vars(module):
            del module.forward
    fuse_experts(model)  # a mixture of experts: back to transformers' fused layout
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    model.requires_grad_(False)
    return model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def check_range(model: nn.Module, dtype: str) -> None:
    """After densify: UserError naming the first tensor that `dtype` could not hold (the artifact's
    tensors are finite, so an inf after the cast is an overflow: float16 ends at 65504), before
    anything is written."""
    from ..errors import UserError

    name = first_non_finite(model)
    if name is not None:
        raise UserError(f"tensor {name} holds values beyond {dtype}'s range (float16 ends at 65504); pass "
                        "--dtype bfloat16 or --dtype float32")
