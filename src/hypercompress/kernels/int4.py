"""4-bit weight-only GEMM through torch's tinygemm kernels (the int4 layout torchao also uses).

CUDA: `aten._weight_int4pack_mm(x (M, K) bf16, packed, group, scales_and_zeros (K/group, N, 2) bf16)`;
CPU: `aten._weight_int4pack_mm_for_cpu` (bfloat16 or float16 activations). It takes float32 too, but
measured 28x slower than with bfloat16 (a scalar loop), so a float32 caller's decode-sized calls (at
most F32_KERNEL_ROWS rows) cast x to bfloat16 for the kernel and the result back (bfloat16 rounding
of x, s and z_t: the same error a bfloat16 caller has), and its longer calls run one float32 GEMM on
W dequantized once in float32 at build time (dequantizing a 4096 x 11008 W per call took 165 ms, 10x
the GEMM it feeds; the float32 weight is what a float32 caller held before, the codes add 1/8).
Both compute
W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g] with g = k // group and 4-bit q, so our grids map
exactly (kernels/__init__.py). Groups: 32, 64, 128 or 256 input columns; a stored group that is a
multiple of one (e.g. 192 = 3 x 64, or a whole row) repeats its scale over the kernel's groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .paths import FastPath

KERNEL_GROUPS = (256, 128, 64, 32)


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The largest tinygemm group dividing the stored group (None: no exact fit)."""
    return next((g for g in KERNEL_GROUPS if group_size % g == 0 and in_features % g == 0), None)


def _inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def int4_supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                   group_size: int) -> str | None:
    """None when the kernel takes this layer on this device and dtype, else the reason it does not."""
    if kernel_group(group_size, in_features) is None:
        return f"group {group_size} is no multiple of 32"
    if _inner_k_tiles(in_features) is None:
        return f"in_features {in_features} is no multiple of 32"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return "the CUDA int4 kernel computes in bfloat16 only"
        if torch.cuda.get_device_capability(device)[0] < 8 or out_features % 8:
            return "needs compute capability 8.0 and out_features divisible by 8"
        return None  # (N % 8, K % (tiles x 16), group: checked above; the CUDA packing's whole contract)
    if device.type == "cpu":
        if out_features % 16:  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
            return f"out_features {out_features} is no multiple of 16 (the CPU int4 packing)"
        return None if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else "torch too old"
    return f"no int4 kernel for {device.type}"


# Above this many rows of x (tokens), tinygemm loses to dequantize + dense GEMM. Measured, 4096 x
# 11008 g128: H200 tinygemm 14 us at 1 token, 20 at 4, 54 at 16, 6.4 ms at 2048, dense 26 us up to
# 16 tokens, 0.23 ms at 2048, the fused dequantize ~0.16 ms; 2-core EPYC (bfloat16) tinygemm 1.2 ms
# at 1 token, 8.4 ms at 16 (~0.45 ms a row), dequantize ~110 ms.
GEMM_ROWS = {"cuda": 32, "cpu": 256}
# A float32 caller on the CPU: calls of at most this many rows run the kernel in bfloat16, longer ones
# the float32 weight it keeps. Measured (Xeon, 1 thread, the weights in cache, so dense's best case): cast +
# kernel 47 us vs float32 dense 120 us at 1 row for 1536 x 576, 164 vs 376 us at 8 rows; a decoding
# model reads every weight from memory, where the kernel's 8x fewer bytes win more.
F32_KERNEL_ROWS = 8


def _dequantize(pairs: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor) -> torch.Tensor:
    """pairs (N, K/2) uint8, high nibble first; group_scale, group_zero (N, G, 1) -> W (N, G, K/G):
    W = q * s + z (z = z_t - 8 s)."""
    codes = torch.stack([pairs >> 4, pairs & 15], -1).view(group_scale.shape[0], group_scale.shape[1], -1)
    return torch.addcmul(group_zero, codes.to(group_scale.dtype), group_scale)


_FUSED: list = []


def dequantize(pairs: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor) -> torch.Tensor:
    """`_dequantize`, on CUDA fused into one kernel by torch.compile (Triton; eager if that fails):
    it reads the codes once instead of five passes over the (N, K) weight."""
    if pairs.device.type == "cuda":
        if not _FUSED:
            try:
                _FUSED.append(torch.compile(_dequantize, dynamic=True))
            except Exception:  # no compiler backend: stay eager
                _FUSED.append(_dequantize)
        try:
            return _FUSED[0](pairs, group_scale, group_zero)
        except Exception:
            _FUSED[0] = _dequantize
    return _dequantize(pairs, group_scale, group_zero)


class Int4Linear(FastPath):
    """y = x W^T + b with W held as 4-bit codes in the kernel's packed layout.

    codes: (N, K) integers in [0, 16); scale, zero: (N, K / group_size) float, with
    W[n, k] = (codes[n, k] - 8) * scale[n, k // group_size] + zero[n, k // group_size].
    Inputs of more than `gemm_rows` rows (GEMM_ROWS: prefill) dequantize W from `pairs` (the codes
    two to a byte, high nibble first: a 4-bit QuantLinear's own qweight, shared, not copied) and run
    one dense GEMM; decode runs the tinygemm kernel. A CPU float32 caller: the kernel in bfloat16 (the
    result cast back) up to F32_KERNEL_ROWS rows, above that one float32 GEMM on W dequantized once.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, note: str = "",
                 pairs: torch.Tensor | None = None):
        device = codes.device
        super().__init__(device, dtype, bias)
        # the kernel's activation dtype: a float32 caller's decode-sized calls go through bfloat16
        self.kernel_dtype = torch.bfloat16 if device.type == "cpu" and dtype == torch.float32 else dtype
        out_features, in_features = codes.shape
        group = kernel_group(group_size, in_features)
        repeat = group_size // group
        self.group_scale = scale.to(dtype)[..., None].contiguous()  # (N, G, 1), the stored groups
        self.group_zero = (zero.float() - 8 * scale.float()).to(dtype)[..., None].contiguous()
        scale = scale.float().repeat_interleave(repeat, 1)
        zero = zero.float().repeat_interleave(repeat, 1)
        self.group, self.out_features, self.in_features = group, out_features, in_features
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], -1).to(self.kernel_dtype).contiguous()
        codes = codes.to(torch.uint8)
        self.pairs = pairs.view(out_features, in_features // 2) if pairs is not None else \
            (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
        self.gemm_rows = F32_KERNEL_ROWS if self.kernel_dtype != dtype else GEMM_ROWS.get(device.type, 64)
        tiles = _inner_k_tiles(in_features)
        if device.type == "cuda":
            self.packed = torch.ops.aten._convert_weight_to_int4pack(self.pairs, tiles)
            self.matmul = torch.ops.aten._weight_int4pack_mm
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), tiles)
            self.matmul = torch.ops.aten._weight_int4pack_mm_for_cpu
        via = "" if self.kernel_dtype == dtype else " in bfloat16"
        # a CPU float32 caller's longer calls: the float32 weight, dequantized once
        self.dense = None
        if self.kernel_dtype != dtype:
            self.dense = self.dense_weight()
        above = "the float32 weight dequantized once" if self.dense is not None else "a call dequantizes, then one GEMM"
        self.backend = f"int4 tinygemm g{group} ({device.type}){via}{note}; above {self.gemm_rows} tokens {above}"

    def dense_weight(self) -> torch.Tensor:
        """W (N, K) in the compute dtype: (q - 8) s + z_t, from the packed pairs (or kept, see `dense`)."""
        if self.dense is not None:
            return self.dense
        weight = dequantize(self.pairs, self.group_scale, self.group_zero)
        return weight.view(self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step calls this ~200 times (SmolLM2): no torch call that does nothing (each
        # dispatch costs ~1 us on a CPU; trimming them took 49 to 41 us a call on a 2-core Xeon)
        shape = x.shape
        flat = x.view(-1, shape[-1]) if x.is_contiguous() else x.reshape(-1, shape[-1]).contiguous()
        if flat.shape[0] > self.gemm_rows:
            return F.linear(x, self.dense_weight(), self.bias)
        if self.kernel_dtype is not self.dtype:
            y = self.matmul(flat.to(self.kernel_dtype), self.packed, self.group, self.scales_and_zeros).to(self.dtype)
        else:
            y = self.matmul(flat, self.packed, self.group, self.scales_and_zeros)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)


INT8_GEMM_ROWS = 64  # 2-core EPYC, 4096 x 11008: 2.1 ms at 1 token (dense 4.5), 11 at 16 (6.5)


class Int8RowLinear(FastPath):
    """Symmetric 8-bit codes with one scale per row: y = (x Q^T) * s + b through
    `aten._weight_int8pack_mm(x, Q int8 (N, K), s (N,))`, Q = q - 128."""

    backend = "int8 weight-only (_weight_int8pack_mm)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__(codes.device, dtype, bias)
        self.weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.scale = scale.reshape(-1).to(dtype).contiguous()
        self.out_features = codes.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if flat.shape[0] > INT8_GEMM_ROWS:  # measured: 3x slower than dense at 2048 tokens
            return F.linear(x, self.weight.to(self.dtype) * self.scale[:, None], self.bias)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU only: on CUDA (H200, torch 2.11) the op measured 15x slower than the dense GEMM."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
