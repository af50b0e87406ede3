"""Bit packing of unsigned integer codes (1..8 bits) into a dense uint8 stream.

Codes are written most-significant bit first, code after code, with no padding between codes; the
stream is padded with zero bits to a whole byte only at its end. So N codes of b bits take exactly
ceil(N * b / 8) bytes, whatever b is. For b in {1, 2, 4, 8} a code never straddles a byte, and
`unpack_codes` takes a fast shift-and-mask path; other widths go through an explicit bit matrix.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer tensor of any shape with values in [0, 2**bits) -> flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    values = flat.numpy().astype(np.uint64)
    count = values.size
    values = np.concatenate([values, np.zeros(-count % 8, np.uint64)]).reshape(-1, 8)
    # 8 codes of b bits are one 8b-bit number, MSB first: its b bytes, most significant first
    word = np.zeros(values.shape[0], np.uint64)
    for i in range(8):
        word |= values[:, i] << np.uint64(bits * (7 - i))
    stream = np.stack([(word >> np.uint64(8 * (bits - 1 - j))) & np.uint64(0xFF) for j in range(bits)], axis=1)
    return torch.from_numpy(stream.astype(np.uint8).reshape(-1)[: packed_nbytes(count, bits)].copy())


def pack_codes_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The obvious bit-matrix packing `pack_codes` must equal (tests)."""
    values = codes.reshape(-1).to(torch.int64).cpu().numpy().astype(np.uint8)
    bit_matrix = np.unpackbits(values[:, None], axis=1)[:, 8 - bits:]  # (N, bits), MSB first
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1)).copy())


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: flat uint8 tensor -> (count,) uint8 codes, on packed's device."""
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} packed bytes, got {packed.numel()}")
    if 8 % bits == 0:
        shifts = torch.arange(8 - bits, -1, -bits, device=packed.device, dtype=torch.uint8)
        mask = (1 << bits) - 1
        codes = (packed[:, None] >> shifts) & mask  # (bytes, per_byte)
        return codes.reshape(-1)[:count]
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits - 1, -1, -1, device=packed.device)).to(torch.int32)
    return (stream.reshape(count, bits).to(torch.int32) * weights).sum(1).to(torch.uint8)
