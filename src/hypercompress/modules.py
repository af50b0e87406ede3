"""Finding, reading and replacing linear layers in a model (the base classes of stored and compressed
modules are layers/base.py)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .arch import arch_of, block_linear_names
from .errors import UserError

from .layers.base import LINEAR_TYPES, CompressedModule


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that alias an earlier one (e.g. lm_head.weight tied to the embedding)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        else:
            seen[id(param)] = name
    return aliases


def select_linears(model: nn.Module, targets: list[str] | None, ignore: list[str],
                   default: str = "linears") -> list[str]:
    """Names of the linear layers a stage compresses.

    targets None means the method's default: the architecture's block linears (`default`
    "linears") or its token embedding ("embedding": factor_embedding); otherwise every
    Linear/Conv1D/Embedding whose name matches one of the regexes (re.search). Names matching an
    `ignore` regex are dropped. An lm_head tied to the embedding is refused: target the embedding,
    and the head follows it.
    """
    spec = arch_of(model.config.model_type)
    if targets is None and default == "embedding":
        names = list(spec.embeddings[:1])
    elif targets is None:
        names = block_linear_names(model)
    else:
        names = [
            n for n, m in model.named_modules()
            if isinstance(m, (*LINEAR_TYPES, nn.Embedding)) and any(re.search(p, n) for p in targets)
        ]
    names = [n for n in names if not any(re.search(p, n) for p in ignore)]
    tied = {n.rsplit(".", 1)[0] for n in tied_parameter_names(model)}
    clash = [n for n in names if n in tied]
    if clash:
        raise UserError(
            f"'{clash[0]}' shares its weight with the embedding; target the embedding instead "
            "(the tied head follows it) or add it to 'ignore'"
        )
    return names


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first floating tensor of `model`'s state dict holding inf or nan (tensors on
    the meta device, not yet read, are skipped), or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def carry_embedding_scale(old: nn.Module | None, new: nn.Module) -> None:
    """A scaled embedding (Gemma 2/3: its forward multiplies the rows by `embed_scale`, sqrt(hidden))
    hands the scale to the module replacing it, as its `output_scale` (QuantEmbedding,
    LowRankEmbedding, qat's training module); a module that cannot scale is refused, and so is an
    embedding subclass computing more than a lookup without saying how (UserError)."""
    if isinstance(old, nn.Embedding):
        scale = getattr(old, "embed_scale", None)
        if scale is None and type(old).forward is not nn.Embedding.forward:
            raise UserError(f"{type(old).__name__} computes more than a table lookup, which a compressed "
                            "embedding would drop; leave the embedding out of the targets")
    else:
        scale = getattr(old, "output_scale", None)
    if scale is None or float(scale) == 1.0 or new is old:
        return
    if not hasattr(new, "output_scale"):
        raise UserError(f"the embedding scales its rows by {float(scale):g} and {type(new).__name__} cannot; "
                        "leave the embedding out of the targets")
    new.output_scale = float(scale)


SAVE_ADVICE = ("save it with hypercompress.save(model, tokenizer, DIR) (an artifact that transformers loads after "
               "import hypercompress) or, from an artifact, `hypercompress export ARTIFACT --format hf`")


def guard_plain_saves(model: nn.Module) -> None:
    """The model's save_pretrained / push_to_hub, while it holds compressed modules, raise a one-line
    UserError naming the way that keeps it (SAVE_ADVICE) instead of writing a plain config over
    compressed tensors, which transformers reloads as a randomly initialised model. Once no
    compressed module is left (the hf export densifies first) they work as the class's own."""
    from functools import partial

    for method, guard in (("save_pretrained", _guarded_save_pretrained), ("push_to_hub", _guarded_push_to_hub)):
        if hasattr(type(model), method):  # partials of module functions: a deepcopy or pickle keeps its own
            setattr(model, method, partial(guard, model))


def _refuse_while_compressed(model: nn.Module, method: str) -> None:
    if any(isinstance(m, CompressedModule) for m in model.modules()):
        raise UserError(f"{method} would write a plain config over compressed tensors, which transformers "
                        f"reloads as a random model; {SAVE_ADVICE}")


def _guarded_save_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from .experts import fused

    _refuse_while_compressed(model, "save_pretrained")
    with fused(model):  # unfused experts (experts.py) saved in transformers' own layout
        return type(model).save_pretrained(model, *args, **kwargs)


def _guarded_push_to_hub(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from .experts import fused

    _refuse_while_compressed(model, "push_to_hub")
    with fused(model):
        return type(model).push_to_hub(model, *args, **kwargs)


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) final hidden states (after the final norm) -> (..., V) logits as the model's forward
    makes them: its output layer, then the soft-capping of Gemma 2 (cap x tanh(z / cap)) when set."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at `name` (adding it if the parent has no such child, e.g. a generator at the root).
    Replacing an embedding that the lm_head shares replaces the head too, with a TiedHead reading
    the new module, so the tie (and single storage) is kept; a scaled embedding's scale goes to
    the new module (carry_embedding_scale)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf, None)
    carry_embedding_scale(old, new)
    setattr(parent, leaf, new)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(old, nn.Embedding) and head is not None and getattr(head, "weight", None) is old.weight:
        from .layers.quant_embedding import TiedHead

        head_name = next(n for n, m in model.named_modules() if m is head)
        tied = TiedHead(name)
        replace_module(model, head_name, tied)
        tied.bind(model)


def represented_weights(layout: dict[str, Any]) -> int:
    """Weights a compressed module stands for, from its layout: in x out (+ bias), or vocab x dim
    for a factorized embedding; 0 for a tied head (its table is the embedding's)."""
    out_features = layout.get("out_features", 0)
    return (layout.get("in_features", 0) * out_features + (out_features if layout.get("bias") else 0)
            + layout.get("vocab", 0) * layout.get("dim", 0))


def effective_weights(model: nn.Module) -> int:
    """Weights the model computes with: dense parameters (tied once) plus, for every compressed
    linear or embedding, the in x out (+ bias) it stands for. Structural pruning lowers it;
    quantization and factorization do not (they change how the weights are stored)."""
    seen, total = set(), 0
    stored = {id(t) for m in model.modules() if isinstance(m, CompressedModule) for t in m.parameters()}
    for p in model.parameters():
        if id(p) not in seen and id(p) not in stored:
            seen.add(id(p))
            total += p.numel()
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, CompressedModule)}
    for name, module in compressed.items():
        if any(name.startswith(f"{outer}.") for outer in compressed):
            continue  # the base inside an adapter or a residual generator: counted by its owner
        total += represented_weights(module.layout())
    return total


def count_params(model: nn.Module) -> int:
    """Parameters of a (dense) model, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())
