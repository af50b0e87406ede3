"""Finding, reading and replacing linear layers; the base class of compressed modules.

A compressed module stores only the tensors it needs to rebuild its weight (packed codes, factors...)
as buffers, and `storage_bits()` counts exactly those tensors, so the count equals the bytes saved.
"""

from __future__ import annotations

import abc
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .arch import arch_of, block_linear_names
from .errors import UserError

try:  # GPT-2's Conv1D: y = x @ W + b with W of shape (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


class StoredModule(nn.Module, abc.ABC):
    """A module the artifact rebuilds by its `kind`: its tensors are saved exactly as they are.

    Subclasses hold their saved tensors as persistent buffers or parameters, implement `layout()`
    (the JSON-able construction arguments) and `from_layout()` (an empty module of the right shapes,
    filled later from the artifact's safetensors). A `bind(model)` method, if present, is called
    once every module of a loaded artifact is in place.
    """

    kind: ClassVar[str] = ""

    def storage_bits(self) -> int:
        """Bits of every tensor this module saves (its persistent buffers and parameters)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.state_dict().values())

    @abc.abstractmethod
    def layout(self) -> dict[str, Any]:
        """JSON-able construction arguments (shapes and format options), saved in the manifest."""

    @classmethod
    @abc.abstractmethod
    def from_layout(cls, layout: dict[str, Any]) -> "StoredModule":
        """An empty module of the right buffer shapes, to be filled from the artifact."""

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        """Why a layout (already of the constructor's types, integers in [0, 2**31)) is out of this
        kind's ranges, or None. The strict reader (artifact_reader.py) asks before building."""
        return None

    def misfit(self, original: nn.Module | None) -> str | None:
        """Why this module cannot take the place of `original` (the model's module at its name; None
        where the model has none), or None. A module with no counterpart is added at the root."""
        return None if original is None else f"the model already has a {type(original).__name__} there"

    def check_stored(self) -> str | None:
        """Why the loaded tensors' values are inconsistent (e.g. a mask's count), or None."""
        return None


class CompressedModule(StoredModule):
    """Base of every compressed replacement of a linear layer (or embedding): also implements
    `forward` and `dense_weight`."""

    @abc.abstractmethod
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight this module represents."""

    _fast = None  # a kernels.paths.FastPath once `prepare_fast` built one
    own_path: ClassVar[str | None] = None  # set by kinds whose forward is already their fast path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features): the prepared fast path when x can take it, else
        the reference (the dense weight in x's dtype, then one GEMM). Kinds with a cheaper reference
        (low-rank factors, embeddings) override it."""
        fast = self.fast_or_none(x)
        if fast is not None:
            return fast(x)
        bias = getattr(self, "bias", None)
        return F.linear(x, self.dense_weight(x.dtype), None if bias is None else bias.to(x.dtype))

    def prepare_fast(self, dtype: torch.dtype, workload: str = "decode") -> str:
        """Build the fastest exact forward for this module's device and compute `dtype` (kernels/);
        returns the backend's name. Kinds with an `own_path` keep their forward; otherwise this
        default materializes the dense weight once (generated and KAN layers: their weights are
        computed once at load anyway)."""
        from .kernels.paths import DenseLinear

        if self.own_path is not None:
            self._fast = None
            return self.own_path
        self._fast = DenseLinear(self.dense_weight(dtype).to(self.device()), getattr(self, "bias", None), dtype)
        return self._fast.backend

    def fast_or_none(self, x: torch.Tensor):
        """The prepared fast path if `x` can take it (same device and dtype, no autograd through x
        or through this module's stored tensors, e.g. scales being trained), else None."""
        fast = self._fast
        if fast is None or not fast.accepts(x):
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in self._buffers.values() if t is not None):
            return None
        return fast

    def misfit(self, original: nn.Module | None) -> str | None:
        """A linear kind replaces a Linear/Conv1D of the same (out_features, in_features)."""
        if not isinstance(original, LINEAR_TYPES):
            return f"the model has {type(original).__name__ if original is not None else 'nothing'} there"
        shape = tuple(linear_weight_shape(original))
        mine = (getattr(self, "out_features", None), getattr(self, "in_features", None))
        return None if mine == shape else f"it is {mine[0]} x {mine[1]}, the layer is {shape[0]} x {shape[1]}"

    def device(self) -> torch.device:
        tensor = next(iter(self.buffers()), None)
        if tensor is None:
            tensor = next(iter(self.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def macs(self) -> int:
        """Multiply-adds per token of its forward: in x out unless the format computes less
        (quantized and sparse weights are dequantized to a dense matmul here)."""
        return getattr(self, "in_features", 0) * getattr(self, "out_features", 0)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as (out_features, in_features), float32, detached; an
    Embedding's table as (vocab, dim)."""
    weight = module.weight.detach()
    if Conv1D and isinstance(module, Conv1D):  # Conv1D stores the transpose
        weight = weight.t()
    return weight.float()


def linear_weight_shape(module: nn.Module) -> torch.Size:
    """(out_features, in_features) of a Linear or Conv1D (or an Embedding's (vocab, dim)), without
    reading the weight (it may live on the meta device)."""
    shape = module.weight.shape
    return shape[::-1] if Conv1D and isinstance(module, Conv1D) else shape


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float()


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


def uncompressed(model: nn.Module, name: str, stage: int) -> nn.Module:
    """The linear layer `name`, refusing one an earlier stage already compressed (a streamed
    model's block holding it, or the layer itself outside the blocks, is read from its files
    first: streaming.materialize)."""
    from .arch import arch_of
    from .streaming import materialize

    blocks = f"{arch_of(model.config.model_type).blocks}."
    materialize(model, f"{blocks}{name[len(blocks):].split('.')[0]}." if name.startswith(blocks) else f"{name}.")
    layer = model.get_submodule(name)
    if isinstance(layer, CompressedModule) or not isinstance(layer, (*LINEAR_TYPES, nn.Embedding)):
        raise UserError(f"stage {stage}: '{name}' is already compressed (by an earlier stage, or in the model "
                        "compressed before: an artifact); narrow this stage's targets or add it to ignore")
    return layer


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
    import types

    for method, guard in (("save_pretrained", _guarded_save_pretrained), ("push_to_hub", _guarded_push_to_hub)):
        if hasattr(type(model), method):  # bound methods: a deepcopy or pickle of the model keeps its own
            setattr(model, method, types.MethodType(guard, model))


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
