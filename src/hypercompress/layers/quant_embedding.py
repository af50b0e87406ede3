"""Quantized token embeddings, and an lm_head tied to them.

QuantEmbedding stores the (vocab, dim) table exactly as QuantLinear stores a weight (b-bit codes,
groups along `dim`, float16 scales and zero points) and dequantizes only the rows it looks up.
TiedHead is the lm_head of a model with tied embeddings: it has no tensors of its own and computes
logits with the embedding's dequantized table, so the shared weight is stored (and counted) once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.packing import unpack_codes
from .base import EMBEDDING_KINDS, LINEAR_TYPES, CompressedModule, embedding_misfit
from .quant_linear import QuantLinear, dequantize


class QuantEmbedding(QuantLinear):
    """in_features = embedding dim, out_features = vocabulary size."""

    kind = "quant_embedding"
    own_path = "rows dequantized at lookup"  # a tied head builds its own path from the codes
    compute_dtype = torch.float32  # dtype of the looked-up rows; artifact.load sets it
    output_scale = 1.0  # rows x this (a scaled embedding's, Gemma: modules.carry_embedding_scale)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows for token ids (any shape) -> (*ids.shape, dim)."""
        if (self.in_features * self.bits) % 8:
            return F.embedding(ids, self.dense_weight(dtype))
        flat = ids.reshape(-1)
        groups = self.scales.shape[1]
        row_bytes = self.in_features * self.bits // 8
        packed = self.qweight.view(self.out_features, row_bytes)[flat].reshape(-1)
        codes = unpack_codes(packed, self.bits, flat.numel() * self.in_features)
        codes = codes.view(flat.numel(), groups, self.group_size).to(dtype)
        scale = self.scales[flat].to(dtype)[..., None]
        if self.symmetric:
            zero = torch.tensor(float(1 << (self.bits - 1)), dtype=dtype, device=codes.device)
            weight = dequantize(codes, scale, zero, "int")
        elif self.zero_point == "int":
            zeros = unpack_codes(self.qzeros, self.bits, self.out_features * groups)
            zero = zeros.view(self.out_features, groups)[flat].to(dtype)[..., None]
            weight = dequantize(codes, scale, zero, "int")
        else:
            weight = dequantize(codes, scale, self.zeros[flat].to(dtype)[..., None], "float")
        return weight.reshape(*ids.shape, self.in_features)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids, self.compute_dtype)
        return rows * self.output_scale if self.output_scale != 1.0 else rows

    def misfit(self, original: nn.Module | None) -> str | None:
        return embedding_misfit(self, original)

    def prepare_fast(self, dtype: torch.dtype, workload: str = "decode") -> str:
        return CompressedModule.prepare_fast(self, dtype, workload)  # own_path, not QuantLinear's


class TiedHead(CompressedModule):
    """lm_head whose weight is the (compressed) input embedding: logits = x E^T."""

    kind = "tied_head"

    def __init__(self, source: str):
        super().__init__()
        self.source = source
        self._embedding: list[nn.Module] = []  # a list keeps it out of this module's state dict

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._embedding[0].dense_weight(dtype)

    def macs(self) -> int:
        source = self._embedding[0]
        return source.macs() if hasattr(source, "macs") else source.weight.numel()

    def prepare_fast(self, dtype: torch.dtype, workload: str = "decode") -> str:
        """Logits through the embedding's codes (int4 tinygemm, ...) when it is quantized; a
        factorized embedding already computes through its factors."""
        source = self._embedding[0]
        self._fast = source.build_fast(dtype) if isinstance(source, QuantEmbedding) else None
        return self._fast.backend if self._fast is not None else "through the embedding's factors"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_or_none(x)
        if fast is not None:
            return fast(x)
        source = self._embedding[0]
        if hasattr(source, "logits"):  # a factorized embedding: never build the (V, D) table
            return source.logits(x)
        return F.linear(x, self.dense_weight(x.dtype))

    def layout(self) -> dict[str, Any]:
        return {"source": self.source}

    def misfit(self, original: nn.Module | None) -> str | None:
        """The model's output embedding, tied to the input embedding at `source`."""
        return None if isinstance(original, LINEAR_TYPES) else "the model has no output layer there"

    def bind(self, model: nn.Module) -> None:
        source = model.get_submodule(self.source)
        if getattr(source, "kind", None) not in EMBEDDING_KINDS:
            raise ValueError(f"tied_head source {self.source} is a {type(source).__name__}, not a compressed embedding")
        self._embedding[:] = [source]

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "TiedHead":
        return cls(**layout)
