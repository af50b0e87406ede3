"""Our own Triton kernels: y = x W^T + b with W read as hypercompress stores it (A16 x W1..8).

Why our own: no installable library reads this layout. torch's tinygemm and torchao widen every code
to 4 bits in their own packing (a second copy of the weight, 2 bytes of GPU memory per stored byte,
and 2/3-bit codes read as 4-bit); gemlite (Triton, PyPI) packs in its own layout; Marlin and Machete ship
only inside vLLM. These kernels read the stored tensors themselves, so they are the only copy of the
weight on the GPU:
  - qweight: the codes of W (N, K) row after row, `bits` bits each, most significant bit first
    (formats/packing.py). 8 codes are `bits` whole bytes, so a row of K codes (K % 8 == 0) is
    K * bits / 8 bytes and 2/3-bit codes read 1/2 and 3/4 of the 4-bit bytes;
  - scales (N, G) float16, G = K / group_size;
  - symmetric grids: W = (q - 2^(bits-1)) s; integer zeros: W = (q - z) s with z packed like the
    codes (N * G of them); float zeros: W = q s + m with m (N, G) float16.
Each program walks its K range in (BLOCK_N, BLOCK_K) tiles (BLOCK_K divides the group, so a tile
has one scale per row). It loads the tile's stored bytes contiguously (widths dividing 8) or as units
of 8 codes (BITS bytes: 3, 5, 6, 7 bits), then either (INTERLEAVE; the tuned choice for 2 and 4
bits on the H100, and for 3-bit units too) interleaves each byte's or unit's codes back into column
order with `tl.interleave`, so x is read contiguously, or takes the codes position by position: position j of every byte holds
columns k0 + PER i + j (PER codes per byte or unit), so x is read at those columns. Codes are
dequantized with one FMA in float32 (exact: q s - z s with s from float16, rounded once to the
compute dtype) and either
  - feeds the tensor cores (`tl.dot(W, x^T)`: W is the MMA's A operand, x padded to BLOCK_M >= 16
    tokens), the path for more than one token where a position's slice holds >= 16 columns (else,
    e.g. 3-bit codes in groups of 64 or 2-bit in groups of 32, the CUDA-core path serves), or
  - (one token, `USE_DOT=False`) multiplies on the CUDA cores into a float32 accumulator reduced
    once at the end, or (GROUPSUM) sums q x per tile and applies s and o once per row and tile;
and with SPLIT_K > 1 (PARTIAL) the K range is cut into SPLIT_K slices (more programs for few tokens;
the float32 partials are summed by a second kernel that adds the bias and casts, in a fixed order).
Above the measured crossover (`TritonQuantLinear.gemm_rows`) a call dequantizes W into one buffer
reused by every layer of the device and dtype, then runs the dense GEMM.

Configs: `triton_configs.json` beside this file (written by `benchmarks/kernel_tune.py merge` from a
tuning run on a GPU; the H100 so far) holds per GPU family the best tile shapes per width, token
bucket and layer size, the crossover, and `prefer`: whether ours beat the path it replaces, summed
over 1, 4 and 16 tokens, in a run that also checked their output on that GPU (the H100: w4 and w2
on 7B-sized layers).
`QuantLinear.build_fast` takes these kernels only where `prefer` says so (`triton_preferred`);
elsewhere tinygemm (kernels/int4.py) or the dense weight serves as before.
Untuned shapes take the heuristic in `config_for`. Requires Triton (it comes with torch's CUDA wheels).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .paths import FastPath

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch: no Triton, the tinygemm / dense paths serve
    triton = None

ZERO_SYMMETRIC, ZERO_INT, ZERO_FLOAT = 0, 1, 2
TILE_K = (256, 128, 64, 32)
CONFIG_FILE = Path(__file__).with_name("triton_configs.json")
# token counts the tuned table holds rows for; a call takes the row of the next count up
TOKEN_BUCKETS = (1, 4, 16, 64, 256)


if triton is not None:

    @triton.jit
    def _packed_at(ptr, index, count, BITS: tl.constexpr):
        """The `index`-th of `count` codes of BITS bits packed MSB first from `ptr` (any shape)."""
        bit = index * BITS
        byte = bit >> 3
        first = tl.load(ptr + byte, mask=index < count, other=0).to(tl.int32)
        nbytes = (count * BITS + 7) // 8
        second = tl.load(ptr + byte + 1, mask=(index < count) & (byte + 1 < nbytes), other=0).to(tl.int32)
        return (((first << 8) | second) >> (16 - BITS - (bit & 7)).to(tl.int32)) & ((1 << BITS) - 1)

    @triton.jit
    def _scale_offset(s_ptr, z_ptr, offs_n, n_mask, k0, N, groups, group_size, BITS: tl.constexpr,
                      ZERO: tl.constexpr):
        """(s, o) per row (BLOCK_N,) float32 for the group holding column k0: W = q s + o, with
        o = -2^(bits-1) s, -z s or m. q s and z s are exact in float32 (q, z < 2^8, s from float16),
        so the one FMA rounds (q - z) s once, as the reference does."""
        group = offs_n * groups + k0 // group_size
        scale = tl.load(s_ptr + group, mask=n_mask, other=0).to(tl.float32)
        if ZERO == 0:
            offset = -(1 << (BITS - 1)) * scale
        elif ZERO == 1:
            offset = -_packed_at(z_ptr, group, N * groups, BITS).to(tl.float32) * scale
        else:
            offset = tl.load(z_ptr + group, mask=n_mask, other=0).to(tl.float32)
        return scale, offset

    @triton.jit
    def _packed_tile(q_ptr, row, mask, k0, BITS: tl.constexpr, SLICE: tl.constexpr):
        """The stored bits of W[rows, k0 : k0 + BLOCK_K] as a (BLOCK_N, SLICE) int tile: for widths
        dividing 8 the bytes themselves (contiguous loads, 8 / BITS codes each), else units of 8
        codes (BITS bytes, most significant first) joined into one integer."""
        i = tl.arange(0, SLICE)
        if 8 % BITS == 0:  # k0 is a multiple of the tile: its bytes start SLICE-aligned (vector loads)
            first = tl.multiple_of(k0 * BITS // 8, SLICE)
            return tl.load(q_ptr + row + (first + i)[None, :], mask=mask, other=0).to(tl.int32)
        else:
            base = q_ptr + row + ((k0 // 8 + i) * BITS)[None, :]
            if BITS <= 3:
                word = tl.load(base, mask=mask, other=0).to(tl.int32)
            else:
                word = tl.load(base, mask=mask, other=0).to(tl.int64)
            for t in tl.static_range(1, BITS):
                word = (word << 8) | tl.load(base + t, mask=mask, other=0).to(word.dtype)
            return word

    @triton.jit
    def _position(packed, j: tl.constexpr, BITS: tl.constexpr):
        """Codes at position j of every byte (or unit) of `packed`, as float32: columns PER i + j."""
        if 8 % BITS == 0:
            codes = ((packed >> (8 - BITS * (j + 1))) & ((1 << BITS) - 1)).to(tl.int32)
        else:
            codes = ((packed >> (BITS * (7 - j))) & ((1 << BITS) - 1)).to(tl.int32)
        # int -> float without a conversion instruction: 2^23 + q holds q in its mantissa
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _interleaved(packed, BITS: tl.constexpr):
        """Every code of a (BLOCK_N, S) tile of bytes (BITS dividing 8) or of units of 8 codes (3, 5,
        6, 7 bits) as (BLOCK_N, S * PER) float32 in column order: the codes of a byte or unit, most
        significant first, are interleaved by `tl.interleave` (each thread keeps its own codes: no
        data moves between threads), so x is read contiguously."""
        if BITS == 8:
            codes = packed
        elif BITS == 4:
            codes = tl.interleave(packed >> 4, packed & 15)
        elif BITS == 2:  # positions (0, 2) and (1, 3), then the pairs: 0 1 2 3
            codes = tl.interleave(tl.interleave(packed >> 6, (packed >> 2) & 3),
                                  tl.interleave((packed >> 4) & 3, packed & 3))
        else:  # 8 codes a byte (1 bit) or a unit: positions (0, 4), (2, 6), (1, 5), (3, 7) by the same rule
            mask: tl.constexpr = (1 << BITS) - 1
            c0 = ((packed >> (BITS * 7)) & mask).to(tl.int32)
            c1 = ((packed >> (BITS * 6)) & mask).to(tl.int32)
            c2 = ((packed >> (BITS * 5)) & mask).to(tl.int32)
            c3 = ((packed >> (BITS * 4)) & mask).to(tl.int32)
            c4 = ((packed >> (BITS * 3)) & mask).to(tl.int32)
            c5 = ((packed >> (BITS * 2)) & mask).to(tl.int32)
            c6 = ((packed >> BITS) & mask).to(tl.int32)
            c7 = (packed & mask).to(tl.int32)
            codes = tl.interleave(tl.interleave(tl.interleave(c0, c4), tl.interleave(c2, c6)),
                                  tl.interleave(tl.interleave(c1, c5), tl.interleave(c3, c7)))
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _weights(packed, j: tl.constexpr, scale, offset, BITS: tl.constexpr):
        """W at position j of the tile, float32: q s + o, one FMA."""
        return _position(packed, j, BITS) * scale[:, None] + offset[:, None]

    @triton.jit
    def _tile(q_ptr, s_ptr, z_ptr, offs_n, n_mask, row, k0, N, K, groups, group_size, BITS: tl.constexpr,
              ZERO: tl.constexpr, SLICE: tl.constexpr):
        """(scale, offset, packed bits) of the tile at column k0 (rows past N, or k0 past K, read
        nothing: a split's last slice may end past K)."""
        live = n_mask & (offs_n * 0 + k0 < K)
        scale, offset = _scale_offset(s_ptr, z_ptr, offs_n, live, k0, N, groups, group_size, BITS, ZERO)
        return scale, offset, _packed_tile(q_ptr, row, live[:, None], k0, BITS, SLICE)

    @triton.jit(do_not_specialize=["M"])  # one compile serves every token count
    def _quant_matmul(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, row_bytes, groups, group_size, k_split,
                      stride_xm, BITS: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PARTIAL: tl.constexpr, USE_DOT: tl.constexpr, INTERLEAVE: tl.constexpr,
                      GROUPSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PER: tl.constexpr):
        """y (M, N) = x (M, K) W^T (+ b); PARTIAL: float32 partials (grid[2] slices of K, M, N) instead.

        INTERLEAVE: a tile's codes are interleaved back into column order and x is read
        contiguously. Otherwise they are taken position by position (PER codes per byte or
        unit): position j of a tile holds columns k0 + PER i + j, so x is read at those columns.
        GROUPSUM (one token, INTERLEAVE): sum_k (q s + o) x_k = s sum_k q x_k + o sum_k x_k over the
        tile's group, one FMA per code instead of two."""
        SLICE: tl.constexpr = BLOCK_K // PER
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        row = offs_n[:, None] * row_bytes  # an argument: Triton specializes it when divisible by 16
        cols = tl.arange(0, SLICE) * PER
        k_start = pid_k * k_split
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # BLOCK_M == 1 without USE_DOT: row pid_m
        m_mask = offs_m < M
        if USE_DOT:  # tensor cores: x padded to BLOCK_M (>= 16) rows
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T: W is the MMA's A operand
        elif GROUPSUM:  # one row of x on the CUDA cores, reduced per tile
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        elif INTERLEAVE:  # one row of x on the CUDA cores; one reduction over K at the end
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, SLICE), dtype=tl.float32)
        for step in range(0, k_split, BLOCK_K):  # the last slice may end past K: masked
            k0 = k_start + step
            scale, offset, packed = _tile(q_ptr, s_ptr, z_ptr, offs_n, n_mask, row, k0, N, K, groups,
                                          group_size, BITS, ZERO, SLICE)
            if INTERLEAVE:
                q = _interleaved(packed, BITS)  # (BLOCK_N, BLOCK_K)
                k = k0 + tl.arange(0, BLOCK_K)
                if USE_DOT:
                    x = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None],
                                mask=m_mask[None, :] & (k < K)[:, None], other=0.0)  # (BLOCK_K, BLOCK_M)
                    acc = tl.dot((q * scale[:, None] + offset[:, None]).to(x.dtype), x, acc)
                else:
                    x = tl.load(x_ptr + pid_m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                    if GROUPSUM:
                        acc += tl.sum(q * x[None, :], axis=1) * scale + offset * tl.sum(x, axis=0)
                    else:
                        acc += (q * scale[:, None] + offset[:, None]) * x[None, :]
            else:
                for j in tl.static_range(PER):
                    w = _weights(packed, j, scale, offset, BITS)
                    k = k0 + cols + j
                    if USE_DOT:
                        x = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None],
                                    mask=m_mask[None, :] & (k < K)[:, None], other=0.0)  # (SLICE, BLOCK_M)
                        acc = tl.dot(w.to(x.dtype), x, acc)
                    else:
                        x = tl.load(x_ptr + pid_m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                        acc += w * x[None, :]
        if GROUPSUM:
            acc = acc[:, None]  # (BLOCK_N, 1): the row's y^T
        elif not USE_DOT:
            acc = tl.sum(acc, axis=1)[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        out = offs_m[None, :] * N + offs_n[:, None]
        if PARTIAL:
            tl.store(y_ptr + pid_k * M * N + out, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_splits(p_ptr, b_ptr, y_ptr, M, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """y = sum over the SPLITS float32 partials (in order) + b, cast to y's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(SPLITS):
            acc += tl.load(p_ptr + split * M * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantize(q_ptr, s_ptr, z_ptr, w_ptr, N, K, row_bytes, groups, group_size, BITS: tl.constexpr,
                    ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER: tl.constexpr):
        """W (N, K) in w's dtype from the stored tensors, one (BLOCK_N, BLOCK_K) tile per program."""
        SLICE: tl.constexpr = BLOCK_K // PER
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k0 = tl.program_id(1) * BLOCK_K
        scale, offset, packed = _tile(q_ptr, s_ptr, z_ptr, offs_n, n_mask, offs_n[:, None] * row_bytes,
                                      k0, N, K, groups, group_size, BITS, ZERO, SLICE)
        first = w_ptr + offs_n[:, None].to(tl.int64) * K + k0  # N K may pass 2^31
        # the tile in column order (bytes or units of 8 codes interleaved): contiguous stores. The
        # position-by-position stores it replaced for units cost 1.7 ms per 45 M 3-bit weights (H100)
        w = _interleaved(packed, BITS) * scale[:, None] + offset[:, None]
        tl.store(first + tl.arange(0, BLOCK_K)[None, :], w.to(w_ptr.dtype.element_ty), mask=n_mask[:, None])


def codes_per_load(bits: int) -> int:
    """Codes per byte for widths dividing 8, else per unit of 8 codes (`bits` bytes)."""
    return 8 // bits if 8 % bits == 0 else 8


def tile_k(group_size: int) -> int | None:
    """The largest K tile (32..256) dividing the group: a tile then has one scale per row."""
    return next((t for t in TILE_K if group_size % t == 0), None)


def triton_supported(device: torch.device, dtype: torch.dtype, bits: int, out_features: int, in_features: int,
                     group_size: int) -> str | None:
    """None when the Triton kernels take this layer on this device and dtype, else why not."""
    if out_features * in_features * bits >= 8 << 31:
        return "2 GiB of codes or more (the kernels' offsets are 32-bit)"
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda":
        return "the Triton kernels run on CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return "the Triton kernels compute in bfloat16 or float16"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "the Triton kernels need compute capability 8.0"
    if not 1 <= bits <= 8:
        return f"{bits}-bit codes"
    if tile_k(group_size) is None or in_features % group_size:
        return f"group {group_size} is no multiple of 32"
    return None


def size_class(out_features: int, in_features: int) -> str:
    """The tuned table's two layer sizes: 'large' (>= 8 M weights, a 7B MLP) or 'small'."""
    return "large" if out_features * in_features >= 8_000_000 else "small"


def token_bucket(rows: int) -> int:
    return next((b for b in TOKEN_BUCKETS if rows <= b), TOKEN_BUCKETS[-1])


def gpu_family(device: torch.device) -> str:
    """'H100', 'H200', ... from the device name ('NVIDIA H100 80GB HBM3' -> 'H100'), or the name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return next((word for word in name.replace("-", " ").split() if re.fullmatch(r"[A-Z]{1,2}\d+[A-Z]*", word)), name)


@lru_cache(maxsize=None)
def tuned_table() -> dict:
    """triton_configs.json: {gpu family: {"configs": {"w4-m16-large": config, ...},
    "gemm_rows": {"w4-large": rows, ...}, "prefer": {"w4-large": "triton", ...}}}; {} when the file
    is missing or unreadable."""
    try:
        table = json.loads(CONFIG_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "USE_DOT", "INTERLEAVE", "GROUPSUM", "num_warps",
               "num_stages")


def _table_field(family: str, field: str) -> dict:
    """tuned_table()[family][field] where both are mappings, else {} (a damaged file serves nothing)."""
    entry = tuned_table().get(family)
    value = entry.get(field) if isinstance(entry, dict) else None
    return value if isinstance(value, dict) else {}


def _valid_config(config) -> bool:
    """Every key present with a value the kernels compile: tiles powers of two up to 256, ..."""
    if not isinstance(config, dict) or not set(CONFIG_KEYS) <= set(config):
        return False
    power = lambda v, top: type(v) is int and 1 <= v <= top and v & (v - 1) == 0  # noqa: E731
    return (all(power(config[k], 256) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) and config["BLOCK_K"] >= 32
            and power(config["SPLIT_K"], 64) and power(config["num_warps"], 16)
            and type(config["num_stages"]) is int and 1 <= config["num_stages"] <= 8
            and type(config["USE_DOT"]) is bool and (config["BLOCK_M"] >= 16 if config["USE_DOT"] else config["BLOCK_M"] == 1)
            and type(config["INTERLEAVE"]) is bool and type(config["GROUPSUM"]) is bool
            and not (config["GROUPSUM"] and (config["USE_DOT"] or not config["INTERLEAVE"])))


def heuristic_config(rows: int, out_features: int, in_features: int) -> dict:
    """Tile shapes for GPUs the table does not hold: enough programs to fill about 132 SMs 4 times."""
    if rows == 1:
        config = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "USE_DOT": False, "GROUPSUM": True,
                  "num_warps": 4, "num_stages": 2}
    elif rows <= 64:
        config = {"BLOCK_M": max(16, 1 << (rows - 1).bit_length()), "BLOCK_N": 64, "BLOCK_K": 128,
                  "USE_DOT": True, "GROUPSUM": False, "num_warps": 4, "num_stages": 3}
    else:
        config = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "USE_DOT": True, "GROUPSUM": False,
                  "num_warps": 8, "num_stages": 3}
    config["INTERLEAVE"] = True
    tiles = -(-out_features // config["BLOCK_N"]) * -(-rows // config["BLOCK_M"])
    split = 1
    while tiles * split < 512 and in_features // (split * 2) >= 4 * config["BLOCK_K"] and split < 16:
        split *= 2
    return {**config, "SPLIT_K": split}


def config_for(family: str, bits: int, rows: int, out_features: int, in_features: int) -> dict:
    """The tuned config for this GPU family, bits, token bucket and layer size, else the heuristic."""
    key = f"w{bits}-m{token_bucket(rows)}-{size_class(out_features, in_features)}"
    config = _table_field(family, "configs").get(key)
    if _valid_config(config):
        return {k: config[k] for k in CONFIG_KEYS}
    return heuristic_config(rows, out_features, in_features)


def triton_preferred(device: torch.device, bits: int, out_features: int, in_features: int) -> bool:
    """Whether the tuned table measured our kernel, summed over 1, 4 and 16 tokens, at least as fast as the path it
    replaces on this GPU family (torch's int4 tinygemm for <= 4 bits, the dense weight above):
    `prefer` {"w4-large": "triton" | "other"}. A family or width never measured keeps the old path."""
    key = f"w{bits}-{size_class(out_features, in_features)}"
    return _table_field(gpu_family(device), "prefer").get(key) == "triton"


DEFAULT_GEMM_ROWS = 256


def gemm_rows_for(family: str, bits: int, out_features: int, in_features: int) -> int:
    """Calls of more rows than this dequantize W and run the dense GEMM (measured per GPU family,
    width and layer size; DEFAULT_GEMM_ROWS where the table has no measurement)."""
    key = f"w{bits}-{size_class(out_features, in_features)}"
    rows = _table_field(family, "gemm_rows").get(key)
    return rows if type(rows) is int and 0 < rows <= 1 << 20 else DEFAULT_GEMM_ROWS


_WORKSPACE: dict = {}


def workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One buffer per device and dtype, grown to the largest W dequantized, reused by every layer."""
    key = (device, dtype)
    buffer = _WORKSPACE.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACE[key] = torch.empty(numel, device=device, dtype=dtype)
    return buffer[:numel]


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, zero_kind: int, group_size: int,
                 out_features: int, config: dict) -> torch.Tensor:
    """x (M, K) bfloat16/float16 with unit stride in K -> y (M, out_features) in x's dtype.

    qweight: flat uint8, the stored codes; scales (N, G) float16; zeros: the packed integer zeros
    (ZERO_INT), float zeros (N, G) (ZERO_FLOAT), or None (ZERO_SYMMETRIC); config: CONFIG_KEYS."""
    M, K = x.shape
    N = out_features
    per = codes_per_load(bits)
    block_k = max(min(config["BLOCK_K"], tile_k(group_size)), per)
    use_dot = config["USE_DOT"]
    interleave = config["INTERLEAVE"]
    if use_dot and not interleave and block_k // per < 16:  # tl.dot takes K >= 16 a slice: the group's largest tile
        block_k = tile_k(group_size)
        use_dot = block_k // per >= 16  # else (3-bit g64, 2-bit g32, ...) the CUDA-core path
    block_m = config["BLOCK_M"] if use_dot else 1
    per_split = -(-K // config["SPLIT_K"])
    k_split = -(-per_split // block_k) * block_k
    splits = -(-K // k_split)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    partial = y if splits == 1 else torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(M, block_m), splits)
    _quant_matmul[grid](
        x, qweight, scales, scales if zeros is None else zeros, y if bias is None else bias, partial,
        M, N, K, K // 8 * bits, K // group_size, group_size, k_split, x.stride(0),
        BITS=bits, ZERO=zero_kind, HAS_BIAS=bias is not None, PARTIAL=splits > 1, USE_DOT=use_dot,
        INTERLEAVE=interleave, GROUPSUM=config["GROUPSUM"] and interleave and not use_dot, BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k, PER=per,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if splits > 1:
        block = 1024
        _sum_splits[(triton.cdiv(M * N, block),)](partial, y if bias is None else bias, y, M, N, splits,
                                                 HAS_BIAS=bias is not None, BLOCK=block)
    return y


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      zero_kind: int, group_size: int, out_features: int, in_features: int,
                      out: torch.Tensor) -> torch.Tensor:
    """W (out_features, in_features) written into `out` (at least N * K elements, the compute dtype)."""
    N, K = out_features, in_features
    block_n, block_k = 64, tile_k(group_size)
    weight = out[: N * K].view(N, K)
    _dequantize[(triton.cdiv(N, block_n), K // block_k)](
        qweight, scales, scales if zeros is None else zeros, weight, N, K, K // 8 * bits, K // group_size, group_size,
        BITS=bits, ZERO=zero_kind, BLOCK_N=block_n, BLOCK_K=block_k, PER=codes_per_load(bits), num_warps=4)
    return weight


class TritonQuantLinear(FastPath):
    """y = x W^T + b from a QuantLinear's stored tensors (shared, not copied) through our Triton
    kernels: up to `gemm_rows` tokens the fused kernel, above that W dequantized into the shared
    workspace and one dense GEMM. Configs per token bucket come from the tuned table (config_for)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, zero_kind: int,
                 bits: int, group_size: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, note: str = ""):
        super().__init__(qweight.device, dtype, bias)
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.zero_kind, self.bits, self.group_size = zero_kind, bits, group_size
        self.out_features, self.in_features = out_features, in_features
        family = gpu_family(qweight.device)
        self.configs = {bucket: config_for(family, bits, bucket, out_features, in_features)
                        for bucket in TOKEN_BUCKETS}
        self.gemm_rows = gemm_rows_for(family, bits, out_features, in_features)
        tuned = "tuned" if family in tuned_table() else "untuned"
        self.backend = (f"triton w{bits} g{group_size} as stored ({tuned} for {family}){note}; "
                        f"above {self.gemm_rows} tokens dequantize + GEMM")

    def dense_weight(self) -> torch.Tensor:
        """W (N, K) in the compute dtype, in the shared workspace (overwritten by the next layer)."""
        buffer = workspace(self.device, self.dtype, self.out_features * self.in_features)
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.bits, self.zero_kind,
                                 self.group_size, self.out_features, self.in_features, buffer)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows > self.gemm_rows:
            return F.linear(x, self.dense_weight(), self.bias)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        y = quant_matmul(flat, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.zero_kind,
                         self.group_size, self.out_features, self.configs[token_bucket(rows)])
        return y.reshape(*x.shape[:-1], self.out_features)
