"""The base classes of every module an artifact stores (layers/ and nothing below it).

A compressed module stores only the tensors it needs to rebuild its weight (packed codes, factors...)
as buffers, and `storage_bits()` counts exactly those tensors, so the count equals the bytes saved.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

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
        kind's ranges, or None. The strict reader (storage/reader.py) asks before building."""
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

    def __getstate__(self) -> dict:
        """A pickle (torch.save of the whole model) keeps the stored tensors, not the fast path
        (torch's kernel handles do not pickle): the copy runs its reference forward until
        `hypercompress.prepare` builds one again."""
        state = super().__getstate__()
        state.pop("_fast", None)
        return state

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
        from ..kernels.paths import DenseLinear

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


EMBEDDING_KINDS = ("quant_embedding", "low_rank_embedding")  # the compressed embeddings a TiedHead reads


def embedding_misfit(module: CompressedModule, original: nn.Module | None) -> str | None:
    """An embedding kind replaces an nn.Embedding of (vocab = out_features, dim = in_features)."""
    if not isinstance(original, nn.Embedding):
        return f"the model has {type(original).__name__ if original is not None else 'nothing'} there, not an embedding"
    if tuple(original.weight.shape) != (module.out_features, module.in_features):
        return f"it is {module.out_features} x {module.in_features}, the embedding is {tuple(original.weight.shape)}"
    return None
