"""QuantLinear: a linear layer stored as packed b-bit integer codes with per-group scales.

Weight W (out_features, in_features) is cut into groups of `group_size` consecutive input columns.
Each group g of each row has a float16 scale s and a zero point:
  - symmetric:            W ~ (q - 2^(b-1)) * s                 (no zero point stored)
  - asymmetric, int zero: W ~ (q - z) * s,  z in [0, 2^b) packed with b bits (GPTQ / llm-compressor)
  - asymmetric, float:    W ~ q * s + m,    m a float16 minimum (GGUF Q4_1 / HQQ style)
with codes q in [0, 2^b). Stored: the packed codes, scales and zero points, nothing else.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..formats.packing import pack_codes, packed_nbytes, unpack_codes
from .base import CompressedModule

SCALE_DTYPE = torch.float16


def resolve_group_size(name: str, in_features: int, group_size: int) -> int:
    """Input columns per scale of a quantized layout: `group_size`, or `in_features` for -1 (one
    group per row). Raises UserError naming `name` and the group sizes that would do when
    `group_size` does not divide `in_features` (every group holds the same number of columns)."""
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        divisors = [d for d in (32, 64, 96, 128, 192, 256) if in_features % d == 0]
        raise UserError(
            f"{name}: group_size {group} does not divide in_features {in_features}; "
            f"use one that does ({', '.join(map(str, divisors)) or 'e.g. -1'}) or -1 for whole rows"
        )
    return group


def fit_grid(groups: torch.Tensor, bits: int, symmetric: bool, zero_point: str):
    """Min-max grid per group. groups: (..., g) float32 -> (scale, zero), each (..., 1) float32.

    Scales (and float zeros) are rounded to float16 here, so that codes are chosen against the
    values that will be stored. Integer zeros are whole numbers in [0, 2^b - 1].
    """
    maxq = (1 << bits) - 1
    if symmetric:
        absmax = groups.abs().amax(-1, keepdim=True)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    elif zero_point == "float":
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low) / maxq
        zero = low.to(SCALE_DTYPE).float()
    else:
        low = groups.amin(-1, keepdim=True).clamp(max=0)
        high = groups.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / maxq
    scale = scale.to(SCALE_DTYPE).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric and zero_point == "int":
        zero = torch.round(-low / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale, zero, bits: int, zero_point: str) -> torch.Tensor:
    """Nearest codes on a fitted grid (float tensor of whole numbers in [0, 2^b - 1])."""
    maxq = (1 << bits) - 1
    if zero_point == "float":
        return torch.round((w - zero) / scale).clamp(0, maxq)
    return torch.round(w / scale + zero).clamp(0, maxq)


def dequantize(codes: torch.Tensor, scale, zero, zero_point: str) -> torch.Tensor:
    if zero_point == "float":
        return codes * scale + zero
    return (codes - zero) * scale


def grid_problem(layout: dict[str, Any]) -> str | None:
    """Range problem of a quantization grid's layout (bits 1..8, or 16 where `allow_16`), or None."""
    if min(layout["in_features"], layout["out_features"]) < 1:
        return "in_features and out_features must be at least 1"
    if not 1 <= layout["bits"] <= 8:
        return f"bits = {layout['bits']} (1..8 are stored as codes)"
    group = layout.get("group_size", 0)
    if group < 1 or layout["in_features"] % group:
        return f"group_size = {group} must divide in_features = {layout['in_features']}"
    return None


class QuantLinear(CompressedModule):
    """y = x W^T + b with W rebuilt from packed codes at each forward (memory holds only codes)."""

    kind = "quant"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, zero_point: str = "int", bias: bool = False):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.symmetric, self.zero_point = symmetric, zero_point
        groups = in_features // group_size
        count = out_features * in_features
        self.register_buffer("qweight", torch.zeros(packed_nbytes(count, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE))
        if not symmetric and zero_point == "int":
            nbytes = packed_nbytes(out_features * groups, bits)
            self.register_buffer("qzeros", torch.zeros(nbytes, dtype=torch.uint8))
        elif not symmetric:
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=SCALE_DTYPE) if bias else None)

    @classmethod
    def from_codes(cls, codes, scale, zero, bias, bits, symmetric, zero_point) -> "QuantLinear":
        """codes: (out, groups, g) whole-number floats; scale/zero: (out, groups, 1)."""
        out_features, groups, group_size = codes.shape
        layer = cls(groups * group_size, out_features, bits, group_size, symmetric, zero_point,
                    bias is not None)
        layer.qweight.copy_(pack_codes(codes.to(torch.uint8), bits))
        layer.scales.copy_(scale[..., 0].to(SCALE_DTYPE))
        if hasattr(layer, "qzeros"):
            layer.qzeros.copy_(pack_codes(zero[..., 0].to(torch.uint8), bits))
        elif hasattr(layer, "zeros"):
            layer.zeros.copy_(zero[..., 0].to(SCALE_DTYPE))
        if bias is not None:
            layer.bias.copy_(bias.to(SCALE_DTYPE))
        return layer

    def _zero(self, dtype: torch.dtype) -> torch.Tensor:
        groups = self.scales.shape[1]
        if self.symmetric:
            return torch.tensor(float(1 << (self.bits - 1)), dtype=dtype, device=self.scales.device)
        if self.zero_point == "int":
            z = unpack_codes(self.qzeros, self.bits, self.out_features * groups)
            return z.view(self.out_features, groups, 1).to(dtype)
        return self.zeros.to(dtype)[..., None]

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.scales.shape[1]
        codes = unpack_codes(self.qweight, self.bits, self.out_features * self.in_features)
        codes = codes.view(self.out_features, groups, self.group_size).to(dtype)
        scale = self.scales.to(dtype)[..., None]
        zero_point = "float" if (not self.symmetric and self.zero_point == "float") else "int"
        weight = dequantize(codes, scale, self._zero(dtype), zero_point)
        return weight.reshape(self.out_features, self.in_features)

    def code_matrix(self) -> torch.Tensor:
        """The stored codes as an (out_features, in_features) uint8 tensor."""
        count = self.out_features * self.in_features
        return unpack_codes(self.qweight, self.bits, count).view(self.out_features, self.in_features)

    def tinygemm_zero(self) -> torch.Tensor:
        """z_t (out, groups) float32 with W = (q - 8) s + z_t per group (kernels/int4.py)."""
        scale = self.scales.float()
        if self.symmetric:
            return (8 - (1 << (self.bits - 1))) * scale
        if self.zero_point == "int":
            return (8 - self._zero(torch.float32)[..., 0]) * scale
        return 8 * scale + self.zeros.float()

    def tinygemm_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (out, in) uint8 in [0, 16), z_t (out, groups)) with W = (codes - 8) s + z_t.

        Integer-zero and symmetric codes of b <= 3 bits are re-centred, q' = q + 8 - z (still in
        [0, 16)), so that z_t = 0: no bfloat16 rounding of a per-group offset, only of s (as in the
        reference forward). 4-bit and float-zero codes go in as stored."""
        codes = self.code_matrix()
        if self.bits == 4 or not (self.symmetric or self.zero_point == "int"):
            return codes, self.tinygemm_zero()
        groups = self.scales.shape[1]
        shift = (8 - self._zero(torch.float32)).expand(self.out_features, groups, self.group_size)
        codes = (codes.view_as(shift) + shift).to(torch.uint8).view(codes.shape)
        return codes, torch.zeros_like(self.scales, dtype=torch.float32)

    def triton_zeros(self) -> tuple[torch.Tensor | None, int]:
        """(the stored zero-point tensor, its kind) as kernels/triton_quant.py reads them."""
        from ..kernels.triton_quant import ZERO_FLOAT, ZERO_INT, ZERO_SYMMETRIC

        if self.symmetric:
            return None, ZERO_SYMMETRIC
        if self.zero_point == "int":
            return self.qzeros, ZERO_INT
        return self.zeros, ZERO_FLOAT

    def build_fast(self, dtype: torch.dtype):
        """The fast path of this weight: on CUDA in bfloat16/float16 our Triton kernels over the
        stored codes (1..8 bits) where the tuned table measured them faster on this GPU family
        (triton_preferred); else int4 tinygemm for 2..4-bit codes, int8 weight-only for symmetric
        8-bit rows, else the dense weight dequantized once (kernels/__init__.py)."""
        from ..kernels.int4 import Int4Linear, Int8RowLinear, int4_supported, int8_supported
        from ..kernels.paths import DenseLinear

        device = self.device()
        if device.type == "cuda":  # our Triton kernels read the stored codes themselves, any width
            from ..kernels.triton_quant import TritonQuantLinear, triton_preferred, triton_supported

            why = triton_supported(device, dtype, self.bits, self.out_features, self.in_features,
                                   self.group_size)
            if why is None and triton_preferred(device, self.bits, self.out_features, self.in_features):
                return TritonQuantLinear(self.qweight, self.scales, *self.triton_zeros(), self.bits,
                                         self.group_size, self.out_features, self.in_features,
                                         self.bias, dtype)
        why = "no exact kernel for 5..8-bit groups"
        if self.bits <= 4:
            why = int4_supported(device, dtype, self.out_features, self.in_features, self.group_size)
            if why is None:
                codes, zero = self.tinygemm_form()
                note = "" if self.bits == 4 else f", w{self.bits} codes as 4-bit"
                pairs = self.qweight if self.bits == 4 else None  # high nibble first: shared
                return Int4Linear(codes, self.scales, zero, self.group_size, self.bias, dtype, note, pairs)
        elif (self.bits == 8 and self.symmetric and self.group_size == self.in_features
              and int8_supported(device, dtype)):
            return Int8RowLinear(self.code_matrix(), self.scales, self.bias, dtype)
        path = DenseLinear(self.dense_weight(dtype), self.bias, dtype)
        path.backend = f"{path.backend}: {why}"
        return path

    def prepare_fast(self, dtype: torch.dtype, workload: str = "decode") -> str:
        """int4 tinygemm / int8 / dense (build_fast); the same for either workload."""
        self._fast = self.build_fast(dtype)
        return self._fast.backend

    def layout(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features, "out_features": self.out_features,
            "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
            "zero_point": self.zero_point, "bias": self.bias is not None,
        }

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantLinear":
        return cls(**layout)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        return grid_problem(layout) or (
            None if layout.get("zero_point", "int") in ("int", "float") else "zero_point must be 'int' or 'float'")

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else f"asym-{self.zero_point}"
        return (f"in={self.in_features}, out={self.out_features}, w{self.bits} "
                f"g{self.group_size} {sym}")
