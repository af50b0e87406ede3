"""GGUF tensor encodings for the GGUF exporter: exact re-packing of quantized codes, re-quantization
of everything else, and the measured cost of each.

GGUF block layouts (ggml-common.h in llama.cpp; GGUF spec, docs/gguf.md): a 2-D tensor (rows, cols)
is stored row-major, each row cut into blocks of QK = 32 consecutive columns, little-endian:

| type | block bytes | content | weight j of the block |
|---|---|---|---|
| Q4_0 | 18 | d fp16, qs[16]             | (q_j - 8) d,   q_j in [0, 15] |
| Q4_1 | 20 | d fp16, m fp16, qs[16]     | q_j d + m,     q_j in [0, 15] |
| Q5_0 | 22 | d fp16, qh u32, qs[16]     | (q_j - 16) d,  q_j in [0, 31] |
| Q5_1 | 24 | d fp16, m fp16, qh, qs[16] | q_j d + m,     q_j in [0, 31] |
| Q8_0 | 34 | d fp16, qs int8[32]        | q_j d,         q_j in [-128, 127] |

qs[i] holds the low nibbles of q_i (bits 0-3) and q_{i+16} (bits 4-7); bit j of qh is bit 4 of q_j.

A hypercompress quant grid (layers/quant_linear.py) with a group size that is a multiple of 32 maps
onto these blocks code for code (each block lies inside one group, so d and m repeat per block):
symmetric (q - 2^(b-1)) s and integer-zero (q - z) s grids become Q4_0 / Q5_0 / Q8_0 with d = s and
the codes shifted, when the shifted codes fit; float-zero q s + m grids become Q4_1 / Q5_1 with d = s;
integer-zero grids also become Q4_1 / Q5_1 with m = fp16(-z s). A mapping is used only when GGUF's
own dequantization (`gguf.quants.dequantize`) gives back the artifact's float32 weight value for value
(so an m = -z s that float16 cannot hold exactly is refused). Otherwise the weight is re-quantized
(`encode`): the nearer of the grid's codes with float16-rounded m and `gguf.quants.quantize` of the
dense weight, with the relative Frobenius error reported. gguf 0.19's quants write no K-quant (Q4_K
and the like are dequantize-only there), so none is offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from ..errors import UserError

QK = 32
# types gguf.quants can write (and llama.cpp reads for every weight, get_rows included)
WRITABLE = {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)}
BLOCK_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
OFFSET = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 0}          # w = (q - OFFSET) d
LEVELS = {T.Q4_0: 16, T.Q4_1: 16, T.Q5_0: 32, T.Q5_1: 32}


@dataclass
class Encoded:
    """One GGUF tensor: `data` as GGUFWriter.add_tensor takes it (float arrays for F32/F16, uint8
    (rows, bytes per row) blocks with `qtype` otherwise), whether it dequantizes to the artifact's
    float32 weight exactly, and the relative Frobenius error ||W_gguf - W|| / ||W|| (0 if exact)."""
    qtype: T
    data: np.ndarray
    exact: bool
    rel_error: float


def parse_type(name: str | None) -> T | None:
    """--gguf-type NAME -> the GGML type (None: chosen per tensor); UserError for other names."""
    if name is None:
        return None
    key = str(name).upper()
    if key not in WRITABLE:
        raise UserError(f"--gguf-type {name}: the GGUF export writes one of {', '.join(WRITABLE)}; pass one of them")
    return WRITABLE[key]


def candidates(bits: int) -> tuple[list[T], T]:
    """(block types a `bits`-bit grid may map into exactly, smallest first; the default type to
    re-quantize into otherwise): the smallest GGUF type with at least as many bits as the stored
    grid: 2..4 -> Q4_0/Q4_1, 5 -> Q5_0/Q5_1, 6..8 -> Q8_0, 16 (dense float16) -> F16."""
    if bits <= 4:
        return [T.Q4_0, T.Q4_1], T.Q4_1
    if bits == 5:
        return [T.Q5_0, T.Q5_1], T.Q5_1
    if bits <= 8:
        return [T.Q8_0], T.Q8_0
    return [], T.F16


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q: (..., 32) codes -> (..., 16) bytes, low nibbles of q_i | q_{i+16} << 4."""
    low = q & 0x0F
    return (low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def pack_blocks(qtype: T, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Codes q (rows, blocks, 32) ints already in the type's range (int8 values for Q8_0), block
    scales d and minimums m (rows, blocks; float16-representable) -> (rows, blocks * block bytes)
    uint8, the block layout of the table above."""
    rows, blocks, _ = q.shape
    parts = [_fp16_bytes(d)]
    if qtype in (T.Q4_1, T.Q5_1):
        parts.append(_fp16_bytes(m))
    if qtype == T.Q8_0:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        if qtype in (T.Q5_0, T.Q5_1):
            high = ((q >> 4) & 1).astype(np.uint8)
            parts.append(np.packbits(high, axis=-1, bitorder="little"))
        parts.append(_nibbles(q.astype(np.uint8)))
    packed = np.concatenate(parts, axis=-1)
    assert packed.shape[-1] == GGML_QUANT_SIZES[qtype][1]
    return packed.reshape(rows, -1)


def quant_grid(module) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None:
    """A QuantLinear / QuantEmbedding's grid per GGUF block: (codes (out, blocks, 32) int32,
    scale (out, blocks) float32, zero (out, blocks) float32, float_zero), where the weight is
    codes * scale + zero if float_zero else (codes - zero) * scale. None when the group size is not
    a multiple of 32 (blocks would straddle groups)."""
    from ..formats.packing import unpack_codes

    out, cols, group = module.out_features, module.in_features, module.group_size
    if group % QK or cols % QK:
        return None
    codes = unpack_codes(module.qweight, module.bits, out * cols).view(out, cols // QK, QK)
    reps = group // QK
    scale = module.scales.float().repeat_interleave(reps, dim=1)
    zero = module._zero(torch.float32).expand(out, cols // group, 1)[..., 0]
    float_zero = not module.symmetric and module.zero_point == "float"
    return (codes.to(torch.int32).numpy(), scale.numpy(), zero.repeat_interleave(reps, dim=1).numpy(),
            float_zero)


def map_exact(grid, qtype: T) -> np.ndarray | None:
    """The grid's codes re-packed as `qtype` blocks, without re-rounding any code or scale, or None
    when they do not fit the type's code range or layout. The caller still verifies the values."""
    codes, scale, zero, float_zero = grid
    if qtype in OFFSET:  # (q' - OFFSET) d with d = s: q' = q - z + OFFSET
        if float_zero:
            return None
        shifted = codes - zero[..., None].astype(np.int32) + OFFSET[qtype]
        low, high = (-128, 127) if qtype == T.Q8_0 else (0, LEVELS[qtype] - 1)
        if shifted.min() < low or shifted.max() > high:
            return None
        return pack_blocks(qtype, shifted, scale)
    if qtype in (T.Q4_1, T.Q5_1):  # q d + m with d = s, m = the float zero or -z s
        if codes.max() >= LEVELS[qtype]:
            return None
        m = zero if float_zero else (-zero * scale).astype(np.float32)
        return pack_blocks(qtype, codes, scale, m.astype(np.float16))
    return None


def _measure(data: np.ndarray, qtype: T, dense: np.ndarray) -> tuple[bool, float]:
    back = dequantize(data, qtype).reshape(dense.shape)
    if np.array_equal(back, dense):
        return True, 0.0
    norm = float(np.linalg.norm(dense.astype(np.float64)))
    diff = float(np.linalg.norm(back.astype(np.float64) - dense.astype(np.float64)))
    return False, diff / norm if norm > 0 else diff


def encode(dense: np.ndarray, bits: int, grid, requested: T | None = None, force: bool = False) -> Encoded:
    """A 2-D weight (rows, cols) float32 -> its GGUF encoding.

    A quant grid (`grid` from `quant_grid`) is re-packed into the first of `candidates(bits)` that
    holds it exactly; any other weight, or a grid no candidate holds, goes to `requested`
    (--gguf-type) or else the default type for `bits`, as the nearer to `dense` (Frobenius norm) of
    the grid's own codes (integer zeros: float16-rounded minimums) and `gguf.quants.quantize(dense)`.
    `force`: `requested` for every weight, exact mappings included. Columns not a multiple of 32
    cannot be blocked: F16 then (F32 or BF16 if requested), as llama.cpp's converter does."""
    tried, fallback = candidates(bits)
    tried = tried if grid is not None else []
    if requested is not None:
        fallback = requested
        tried = [requested] if force else tried
    if dense.shape[-1] % QK:
        tried, fallback = [], (fallback if fallback in (T.F32, T.F16, T.BF16) else T.F16)
    for qtype in tried:
        data = map_exact(grid, qtype) if grid is not None and qtype in BLOCK_TYPES else None
        if data is not None and _measure(data, qtype, dense)[0]:
            return Encoded(qtype, data, True, 0.0)
    best = None
    kept = map_exact(grid, fallback) if grid is not None and fallback in BLOCK_TYPES else None
    for data in [quantize(dense, fallback)] + ([kept] if kept is not None else []):
        exact, error = _measure(data, fallback, dense)
        if best is None or error < best.rel_error:  # (a NaN error never replaces the first)
            best = Encoded(fallback, data, exact, error)
    return best


def permute_rows(data: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py) on the rows of a Q or K projection
    (weight rows, block rows or bias): within each head, rows (0..h/2, h/2..h) are interleaved
    pairwise, turning HF's rotate-half RoPE layout into llama.cpp's adjacent-pairs layout. Applied to
    whole rows, it leaves any block encoding exact; transformers' GGUF loader reverses it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = data.shape[0]
    order = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    return data[order]
