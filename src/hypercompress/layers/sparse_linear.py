"""SparseLinear: a pruned linear layer stored as a bitmask plus its kept values.

Storage: `mask` is one bit per weight (row-major, packed MSB first); the kept weights, in row-major
order, are either float16 `values`, or, when quantized jointly (SparseGPT + quantization), b-bit
`qvalues` codes on a per-group grid (`scales`, `qzeros`) exactly as QuantLinear's. A 2:4 pattern
costs the same with the bitmask (4 bits per 4 weights) as with N:M indices (2 x 2 bits), so one
format serves unstructured and N:M sparsity, and the count is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.packing import pack_codes, packed_nbytes, unpack_codes
from .base import CompressedModule
from .quant_linear import SCALE_DTYPE, dequantize, grid_problem


class SparseLinear(CompressedModule):
    kind = "sparse"

    def __init__(self, in_features: int, out_features: int, nnz: int, bits: int = 16,
                 group_size: int = 0, symmetric: bool = False, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        count = in_features * out_features
        self.register_buffer("mask", torch.zeros(packed_nbytes(count, 1), dtype=torch.uint8))
        if bits == 16:
            self.register_buffer("values", torch.zeros(nnz, dtype=SCALE_DTYPE))
        else:
            groups = in_features // group_size
            self.register_buffer("qvalues", torch.zeros(packed_nbytes(nnz, bits), dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE))
            if not symmetric:
                self.register_buffer("qzeros", torch.zeros(packed_nbytes(out_features * groups, bits),
                                                           dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=SCALE_DTYPE) if bias else None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None):
        """weight (out, in) float, keep (out, in) bool: float16 values of the kept weights."""
        layer = cls(weight.shape[1], weight.shape[0], int(keep.sum()), bias=bias is not None)
        layer.mask.copy_(pack_codes(keep.to(torch.uint8), 1))
        layer.values.copy_(weight[keep].to(SCALE_DTYPE))
        layer._set_bias(bias)
        return layer

    @classmethod
    def from_codes(cls, codes: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor, bias: torch.Tensor | None, bits: int, symmetric: bool):
        """codes (out, groups, g) whole-number floats, keep (out, in) bool, scale/zero (out, groups, 1)."""
        out_features, groups, group = codes.shape
        layer = cls(groups * group, out_features, int(keep.sum()), bits, group, symmetric,
                    bias is not None)
        layer.mask.copy_(pack_codes(keep.to(torch.uint8), 1))
        layer.qvalues.copy_(pack_codes(codes.reshape(out_features, -1)[keep].to(torch.uint8), bits))
        layer.scales.copy_(scale[..., 0].to(SCALE_DTYPE))
        if not symmetric:
            layer.qzeros.copy_(pack_codes(zero[..., 0].to(torch.uint8), bits))
        layer._set_bias(bias)
        return layer

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias.copy_(bias.to(SCALE_DTYPE))

    def keep_mask(self) -> torch.Tensor:
        count = self.out_features * self.in_features
        return unpack_codes(self.mask, 1, count).view(self.out_features, self.in_features).bool()

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        keep = self.keep_mask()
        weight = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.mask.device)
        if self.bits == 16:
            weight[keep] = self.values.to(dtype)
            return weight
        groups = self.in_features // self.group_size
        codes = unpack_codes(self.qvalues, self.bits, self.nnz).to(dtype)
        rows, cols = keep.nonzero(as_tuple=True)
        g = cols // self.group_size
        if self.symmetric:
            zero = torch.full_like(codes, float(1 << (self.bits - 1)))
        else:
            zeros = unpack_codes(self.qzeros, self.bits, self.out_features * groups)
            zero = zeros.view(self.out_features, groups)[rows, g].to(dtype)
        weight[rows, cols] = dequantize(codes, self.scales[rows, g].to(dtype), zero, "int")
        return weight

    def prepare_fast(self, dtype: torch.dtype, workload: str = "decode") -> str:
        """workload "prefill": 2:4 masks through torch.sparse semi-structured kernels on CUDA
        (float16/bfloat16; measured 0.81x dense at 2048 tokens on the H200, but 2.8x slower at 1);
        "decode" (the default), any other pattern or device: the dense weight, dequantized once (no
        sparse kernel beats dense GEMM at one token and these densities)."""
        from ..kernels.paths import DenseLinear, SemiStructuredLinear, is_two_four, semi_structured_ok

        weight, two_four = self.dense_weight(torch.float32), is_two_four(self.keep_mask())
        if workload == "prefill" and two_four and semi_structured_ok(weight, dtype):
            self._fast = SemiStructuredLinear(weight, self.bias, dtype)
        else:
            self._fast = DenseLinear(weight, self.bias, dtype)
            pattern = "2:4" if two_four else "unstructured"
            self._fast.backend = f"{self._fast.backend}: {pattern} on {weight.device.type}, {workload}"
        return self._fast.backend

    def layout(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "nnz": self.nnz,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "SparseLinear":
        return cls(**layout)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        if layout["nnz"] > layout["in_features"] * layout["out_features"]:
            return "nnz exceeds in_features x out_features"
        if layout.get("bits", 16) == 16:
            return None if min(layout["in_features"], layout["out_features"]) >= 1 else "empty shape"
        return grid_problem(layout)

    def check_stored(self) -> str | None:
        kept = int(self.keep_mask().sum())
        return None if kept == self.nnz else f"its mask keeps {kept} weights, its layout says nnz = {self.nnz}"

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        values = "fp16" if self.bits == 16 else f"w{self.bits} g{self.group_size}"
        return f"in={self.in_features}, out={self.out_features}, density={density:.3f}, {values}"
