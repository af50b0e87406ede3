"""The file a plan writes, in bytes, from per-module size tables: no trial compression of the model.

An artifact's model.safetensors is 8 bytes (the header's length), a JSON header padded with spaces to
a multiple of 8 bytes, then every stored tensor's bytes back to back. The stored tensors of a plan
are the tensors no stage compresses (as `artifact.tensors_to_save` keeps them: float16, or float32
beyond float16's range) and each planned module's own (packed codes, scales, zero points, bias).
With the lossless stage every tensor is byte-grouped and zstd-coded on its own into one U8 blob
(formats/lossless.py), so the coded bytes of separate tensors add up exactly. Hence a plan's file
size is a sum of table entries, each module x option RTN-quantized and its tensors coded once
(lazily, on first use, on `workers` threads, one per core by default: torch and zstandard release
the GIL), plus the untouched
tensors' bytes, plus the header computed for exactly the names, dtypes and shapes the plan stores
(`safetensors_file_bytes`, checked against safetensors' own writer in tests/test_size_table.py).

Exact for RTN codes. GPTQ's codes on the same grid code a little differently under zstd: the
planner leaves the modules GPTQ writes their option's GPTQ_CODE_GROWTH of room (`bound_bytes`;
measured below), and `compress` checks the file it writes.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..formats import lossless as lossless_codec
from ..modules import count_params
from .sensitivity import Option

GPTQ_CODE_GROWTH: dict[Option, float] = {(2, -1): 1.089, (2, 64): 1.020, (3, -1): 1.007, (3, 64): 1.002,
                                          (4, -1): 1.002, (4, 64): 1.002, (8, -1): 1.001}
"""Per (bits, group) option, how much larger GPTQ's codes of a block linear code under zstd than the
same linear's RTN codes (which the size table counts), measured on SmolLM2-135M by `python
benchmarks/code_growth.py --windows 32` (every linear at one option, GPTQ on the 32 calibration
windows compress draws by default; benchmarks/results/code_growth.json: 2-bit rows 1.0880, w2 g64
1.0187, 3-bit rows 1.0062, w3 g64 1.0016, 4-bit rows 1.0019, w4 g64 1.0011, 8-bit rows 1.0001 of the
linears' own bytes), rounded up to the next 0.1 point. (On 8 windows, as the planner's GPTQ trials
solve, the codes spread more: 2-bit rows 1.1166, w2 g64 1.0261.) RTN's 2-bit rows code
small (a min-max grid over a whole row leaves most weights in its two middle levels), GPTQ's spread
over all four. A grown module's table bytes are taken x its option's growth when a plan is fit, so
its file lands near [target - 2%, target]; a module's own growth varies around its option's mean
(SmolLM2 at --target-bpw 2.0: the modules a mixed plan puts at 2-bit rows grew less, and the file
stored 2.9% under the target). An option not measured takes the largest growth measured. Every planned artifact records the ratios it met (summary.json:
allocation.size_table.measured_over_predicted, measured_over_bound). Without the lossless stage the
two store the same bytes (same tensors, dtypes and shapes)."""


def code_growth(option: Option) -> float:
    """GPTQ_CODE_GROWTH of `option`, or the largest measured for an option not measured."""
    return GPTQ_CODE_GROWTH.get(tuple(option), max(GPTQ_CODE_GROWTH.values()))


_DTYPE_CODES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
                torch.float64: "F64", torch.int64: "I64"}
# safetensors writes tensors by descending dtype (its Dtype enum's order, the largest alignment
# first), then by name; the offsets in the header follow that order
_DTYPE_RANK = {code: rank for rank, code in enumerate(
    ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: its name, safetensors dtype code ("F16", "U8", ...),
    shape and data bytes."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def stored_tensor(name: str, tensor: torch.Tensor) -> StoredTensor:
    """The entry of `tensor` stored under `name` as it is (no coding). UserError-free: every dtype
    an artifact stores is known (KeyError otherwise, a bug)."""
    return StoredTensor(name, _DTYPE_CODES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size())


def safetensors_header_bytes(tensors: Iterable[StoredTensor], metadata: dict[str, str] | None = None) -> int:
    """Bytes of the JSON header safetensors writes for these tensors (padded to a multiple of 8),
    not counting the 8-byte length before it: `{"__metadata__": {...}, name: {"dtype", "shape",
    "data_offsets": [begin, end]}, ...}`, compact, tensors by descending dtype then name."""
    metadata = {"format": "pt"} if metadata is None else metadata
    ordered = sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))
    parts, offset = [], 0
    if metadata:
        parts.append(f'"__metadata__":{json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)}')
    for t in ordered:
        shape = ",".join(map(str, t.shape))
        parts.append(f'{json.dumps(t.name, ensure_ascii=False)}:{{"dtype":"{t.dtype}","shape":[{shape}],'
                     f'"data_offsets":[{offset},{offset + t.nbytes}]}}')
        offset += t.nbytes
    length = len(("{" + ",".join(parts) + "}").encode())
    return length + (-length) % 8


def safetensors_file_bytes(tensors: Iterable[StoredTensor], metadata: dict[str, str] | None = None) -> int:
    """Exact size of the safetensors file holding these tensors: 8 + header + data."""
    tensors = list(tensors)
    return 8 + safetensors_header_bytes(tensors, metadata) + sum(t.nbytes for t in tensors)


def _cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2


class SizeTable:
    """Bytes of the model.safetensors any allocation of `modules` writes (module -> (bits, group)).

    `model`: the original (dense) model; `modules`: the names a plan allocates (every block linear
    and the embedding); `lossless`: the zstd level of the lossless stage, or None; `grown`: the
    modules whose codes GPTQ writes (`bound_bytes` gives them room). Entries are computed on first
    use and kept: RTN (asymmetric, integer zero, as the planned stages store) of each module at each
    option, its tensors coded as the artifact codes them.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str], lossless: int | None, workers: int | None = None,
                 grown: Iterable[str] = ()):
        from ..storage.artifact import tensors_to_save

        self.model, self.lossless = model, lossless
        self.workers = workers or max(2, min(32, _cores()))
        self.modules = tuple(modules)
        self.grown = frozenset(grown) & frozenset(self.modules)
        self.params = count_params(model)
        self.entries: dict[tuple[str, Option], tuple[StoredTensor, ...]] = {}
        planned = {id(t) for n in self.modules for t in model.get_submodule(n).state_dict(keep_vars=True).values()}
        prefixes = tuple(f"{n}." for n in self.modules)
        state = model.state_dict(keep_vars=True)
        tensors, _ = tensors_to_save(model)
        fixed = {n: t for n, t in tensors.items() if not n.startswith(prefixes) and id(state[n]) not in planned}
        self.fixed = self._code(fixed)

    def _code(self, tensors: dict[str, torch.Tensor]) -> tuple[StoredTensor, ...]:
        """The entries of `tensors` as stored: as they are, or each a U8 blob of its coded bytes."""
        if self.lossless is None:
            return tuple(stored_tensor(n, t) for n, t in tensors.items())
        with ThreadPoolExecutor(self.workers) as pool:
            sizes = list(pool.map(lambda t: lossless_codec.coded_nbytes(t, self.lossless), tensors.values()))
        return tuple(StoredTensor(n, "U8", (size,), size) for n, size in zip(tensors, sizes))

    def _quantized(self, name: str, option: Option) -> dict[str, torch.Tensor]:
        """The tensors RTN stores for module `name` at `option`, by their names in the artifact."""
        from ..methods.rtn import RTN, RtnConfig

        bits, group = option
        module = RTN(RtnConfig(bits=bits, group_size=group)).compress(name, self.model.get_submodule(name))
        return {f"{name}.{key}": t.detach().contiguous().cpu() for key, t in module.state_dict().items()}

    def fill(self, pairs: Iterable[tuple[str, Option]]) -> None:
        """Compute the entries of (module, option) pairs not yet in the table, each pair quantized
        and coded on one of the pool's threads."""
        missing = list(dict.fromkeys(p for p in pairs if p not in self.entries))
        if not missing:
            return
        if self.lossless is None:
            for pair in missing:
                self.entries[pair] = tuple(stored_tensor(n, t) for n, t in self._quantized(*pair).items())
            return
        def coded(pair: tuple[str, Option]) -> tuple[StoredTensor, ...]:
            entries = []
            for name, tensor in self._quantized(*pair).items():
                size = lossless_codec.coded_nbytes(tensor, self.lossless)
                entries.append(StoredTensor(name, "U8", (size,), size))
            return tuple(entries)

        with ThreadPoolExecutor(self.workers) as pool:
            for pair, entry in zip(missing, pool.map(coded, missing)):
                self.entries[pair] = entry

    def file_bytes(self, allocation: dict[str, Option]) -> int:
        """Exact bytes of the model.safetensors an RTN compression of `allocation` writes (every
        planned module must be allocated; KeyError otherwise)."""
        pairs = [(n, allocation[n]) for n in self.modules]
        self.fill(pairs)
        return safetensors_file_bytes([*self.fixed, *(t for pair in pairs for t in self.entries[pair])])

    def bound_bytes(self, allocation: dict[str, Option]) -> int:
        """file_bytes, plus the room GPTQ's codes may take past RTN's: each grown module's coded
        bytes x (its option's code_growth - 1), when the lossless stage codes them (else the same)."""
        exact = self.file_bytes(allocation)
        if self.lossless is None:
            return exact
        return exact + sum(math.ceil(t.nbytes * (code_growth(allocation[n]) - 1))
                           for n in sorted(self.grown) for t in self.entries[(n, allocation[n])])

    def bits_per_weight(self, allocation: dict[str, Option]) -> float:
        """file_bytes x 8 / the original model's parameters."""
        return self.file_bytes(allocation) * 8 / self.params

    def bound_bits_per_weight(self, allocation: dict[str, Option]) -> float:
        """bound_bytes x 8 / the original model's parameters: what a GPTQ plan's file is fit by."""
        return self.bound_bytes(allocation) * 8 / self.params
