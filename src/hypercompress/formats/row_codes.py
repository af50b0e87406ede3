"""Tensors stored as b-bit codes per row (round to nearest, asymmetric): generator parameters,
low-rank embedding tables.

A parameter P of 2 or more dimensions and at least MIN_VALUES entries is viewed as rows
R = P.reshape(-1, P.shape[-1]) (n, m); each row gets a float16 scale s and offset o:
    o = min(R_i), s = (max(R_i) - min(R_i)) / (2^b - 1),  code = round((R_ij - o) / s) in [0, 2^b)
    P_ij ~ o + s * code
Stored per quantized parameter: codes packed at b bits (formats.packing), scale (n,), offset (n,):
b * n * m + 32 n bits instead of 16 n m. Vectors and small tensors stay float16.
"""

from __future__ import annotations

import torch

from .packing import pack_codes, packed_nbytes, unpack_codes

MIN_VALUES = 256
SUFFIXES = ("__codes", "__scale", "__offset")


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` codes of `bits` bits."""
    return packed_nbytes(count, bits)


def is_coded(param: torch.Tensor) -> bool:
    """Whether a parameter of this shape is stored as codes (a function of the shape only)."""
    return param.dim() >= 2 and param.numel() >= MIN_VALUES


@torch.no_grad()
def encode(param: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """param (..., m) -> {"codes": packed uint8, "scale": (n,) fp16, "offset": (n,) fp16}."""
    rows = param.detach().float().reshape(-1, param.shape[-1]).cpu()
    offset = rows.amin(1).half()
    scale = ((rows.amax(1) - offset.float()) / ((1 << bits) - 1)).half()
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    codes = ((rows - offset.float()[:, None]) / safe[:, None]).round().clamp(0, (1 << bits) - 1)
    return {"codes": pack_codes(codes.to(torch.uint8), bits), "scale": scale, "offset": offset}


def meta_codes(param: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Meta tensors of the shapes and dtypes `encode(param, bits)` returns (no data): what an empty
    module built to check an artifact's header stores."""
    rows = param.numel() // param.shape[-1] if param.dim() else 1
    return {"codes": torch.empty(packed_size(param.numel(), bits), dtype=torch.uint8, device="meta"),
            "scale": torch.empty(rows, dtype=torch.float16, device="meta"),
            "offset": torch.empty(rows, dtype=torch.float16, device="meta")}


def levels(codes: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The packed codes of an (n, m) tensor as float32 levels (n, m) in [0, 2^b): the value is
    offset + scale * level, row by row."""
    return unpack_codes(codes, bits, shape[0] * shape[1]).reshape(shape).float()


def decode(entry: dict[str, torch.Tensor], bits: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of `encode` up to rounding: float16 tensor of `shape`."""
    n, m = int(torch.Size(shape).numel() // shape[-1]), shape[-1]
    codes = unpack_codes(entry["codes"], bits, n * m).reshape(n, m).float()
    values = entry["offset"].float()[:, None] + entry["scale"].float()[:, None] * codes
    return values.half().reshape(shape)
