"""Callable fast paths: y = x W^T + b through one kernel, built once from a module's stored tensors.

Each path remembers the device and dtype it was built for; `accepts(x)` tells whether an input can
take it (anything else goes through the module's reference forward).
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F


class FastPath(abc.ABC):
    backend = ""

    def __init__(self, device: torch.device, dtype: torch.dtype, bias: torch.Tensor | None):
        self.device, self.dtype = device, dtype
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.device == self.device and x.dtype == self.dtype and not x.requires_grad

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in the path's dtype."""

    def mark_static(self) -> None:
        """Tell torch.compile that this path's tensors keep their addresses. They live on a plain
        Python object, not as a module's parameters, so a compiled step with CUDA graphs (static
        decode, decode.py) would otherwise treat them as inputs and copy every one of them into
        the graph's own buffers at each replay: a second copy of the weight in GPU memory, and its
        bytes moved once per decoded token. (CUDA only: elsewhere nothing records graphs.)"""
        if self.device.type != "cuda":
            return
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                torch._dynamo.mark_static_address(value)


class DenseLinear(FastPath):
    """W materialized once in the compute dtype: as fast as an uncompressed layer, as large too."""

    backend = "dense (dequantized once)"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__(weight.device, dtype, bias)
        self.weight = weight.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LowRankPath(FastPath):
    """y = (x V^T) U^T + b with the factors cast once (Eckart-Young factors, rank r)."""

    backend = "two GEMMs (factors cast once)"

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__(U.device, dtype, bias)
        self.U, self.V = U.to(dtype).contiguous(), V.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)


class SemiStructuredLinear(FastPath):
    """2:4 sparse W through torch.sparse's semi-structured tensors (cuSPARSELt, else CUTLASS):
    Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks". CUDA, float16/bfloat16 only."""

    backend = "2:4 semi-structured (torch.sparse)"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        from torch.sparse import to_sparse_semi_structured

        super().__init__(weight.device, dtype, bias)
        self.weight = to_sparse_semi_structured(weight.to(dtype).contiguous())
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = F.linear(flat, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def is_two_four(keep: torch.Tensor) -> bool:
    """keep (out, in) bool: exactly 2 kept weights in every 4 consecutive inputs of every row."""
    if keep.shape[1] % 4:
        return False
    return bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all())


def semi_structured_ok(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether torch.sparse can hold this (out, in) weight on its device in `dtype`."""
    if weight.device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(weight.device)[0] < 8:
        return False
    out_features, in_features = weight.shape
    return out_features % 64 == 0 and in_features % 128 == 0
