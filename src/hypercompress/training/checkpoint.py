"""The training loop's checkpoint (distill.py): trained tensors and the optimizer's state, resumable on
the same or another number of processes, sharded or not.

A folder holds safetensors files of tensors "param.<name>" and "state.<key>.<name>" (AdamW's moments,
Adafactor's factored ones) and a state.json naming them, with each file's size and sha256, the
step and the training seconds so far. A run that is not sharded writes one file of whole tensors
(process 0): {"file", "bytes", "sha256", "step", "seconds"}. A sharded run (sharding.py) writes one
file per process, each holding that process's rows of every tensor (FSDP2's dim-0 shards: rows
[r c, min((r + 1) c, rows)) of process r of n, c = ceil(rows / n), torch.chunk's split):
{"shards": [{"file", "bytes", "sha256"}, ...], "step", "seconds"}, the files in process order.
Resuming reads, for each tensor, the rows this process holds now from whichever files hold them
(safetensors slices: only those rows are read), so a run saved on 8 processes resumes on 2, on 1, or
replicated, and the other way round. Every file is checked against its header, its size and its
sha256 before a tensor of it is read; state.json is replaced last (one atomic rename), so at every
instant it describes complete files, and the files it no longer names are deleted after.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import parallel
from ..errors import UserError
from ..storage.checkpoint import (_is_index, check_sha256, read_json, remove_stale, save_json, save_tensors,
                                  tensor_index, unreadable, valid_file_name)
from ..storage.reader import file_sha256

STATE = "state.json"
LEGACY = "distill.safetensors"  # what earlier versions wrote, with no digest: refused
PATTERN = "distill*.safetensors"


def shard_rows(rows: int, shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of a tensor with `rows` rows that shard `index` of `shards` holds
    (torch.chunk's split, which FSDP2 shards dim 0 by: the last shards may be short or empty)."""
    size = math.ceil(rows / shards) if rows else 0
    return min(index * size, rows), min((index + 1) * size, rows)


@dataclass(frozen=True)
class Layout:
    """How the trained tensors a process holds sit in the whole ones: row shard `index` of `shards`
    (sharding.py) of each tensor of whole shape `shapes[name]`; `whole` for unsplit tensors."""
    shards: int
    index: int
    shapes: dict[str, tuple]

    @classmethod
    def whole(cls, params: dict[str, torch.Tensor]) -> "Layout":
        return cls(1, 0, {name: tuple(p.shape) for name, p in params.items()})

    def rows(self, name: str) -> tuple[int, int]:
        shape = self.shapes[name]
        return shard_rows(shape[0], self.shards, self.index) if shape else (0, 0)


def save(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, step: int,
         seconds: float = 0.0, layout: Layout | None = None) -> None:
    """Write this step's checkpoint of `params` (this process's rows of the tensors `layout` says,
    default whole) and their optimizer state. Not sharded: process 0 alone calls it. Sharded: every
    process calls it (it holds collectives) and writes its own rows; process 0 then writes state.json."""
    layout = layout or Layout.whole(params)
    shards, index = layout.shards, layout.index
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu() for n, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and key != "step":
                tensors[f"state.{key}.{name}"] = value.detach().cpu()
    prefix = f"distill-{step}-{_agreed_token() if shards > 1 else secrets.token_hex(4)}"
    file = f"{prefix}.safetensors" if shards == 1 else _shard_name(prefix, index, shards)
    save_tensors(directory / file, tensors, {"step": str(step)})
    entry = {"file": file, "bytes": (directory / file).stat().st_size, "sha256": file_sha256(directory / file)}
    entries = [entry] if shards == 1 else _gather_entries(entry, prefix, shards)
    if parallel.is_main():
        head = entries[0] if shards == 1 else {"shards": entries}
        save_json(directory / STATE, {**head, "step": step, "seconds": round(float(seconds), 3)})
        remove_stale(directory, PATTERN, *(e["file"] for e in entries))
    if shards > 1:
        dist.barrier()  # nobody trains on (and may be killed) before state.json names every shard


def restore(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
            layout: Layout | None = None) -> tuple[int, float]:
    """(the step of the checkpoint in `directory`, its training seconds) ((0, 0) without one), the
    trained tensors and optimizer state restored into `params`, this process's rows of the tensors
    `layout` says (default whole). Raises UserError when a file cannot be read, does not hash to its
    recorded sha256 or does not fit `params`."""
    layout = layout or Layout.whole(params)
    if not (directory / STATE).exists():
        if (directory / LEGACY).exists():  # an earlier version's checkpoint: no digest to verify
            check_sha256(directory / LEGACY, directory, None)
        return 0, 0.0  # none saved yet (a tensors file without a state.json is a killed save's orphan)
    state = read_json(directory / STATE, directory)
    step = state.get("step")
    entries = state.get("shards") if "shards" in state else [state]
    if not (isinstance(entries, list) and entries and _is_index(step)
            and all(isinstance(e, dict) and valid_file_name(e.get("file")) and _is_index(e.get("bytes"))
                    for e in entries)):
        raise unreadable(directory, f"{STATE} lacks a valid file, bytes or step entry")
    files = [_ShardFile(directory, e, len(entries), i) for i, e in enumerate(entries)]
    expected = _expected_keys(files[0].index, layout.shapes, optimizer, directory)
    for file in files:
        file.check(expected, layout.shapes)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_rows_of(files, f"param.{name}", name, layout))
            moments = {key.split(".", 2)[1]: key for key in expected if key.startswith("state.")
                       and key.split(".", 2)[2] == name}
            if moments:
                optimizer.state[p] = {"step": torch.tensor(float(step))}
                for moment, key in moments.items():
                    rows = expected[key] == layout.shapes[name]  # a moment shaped like its tensor
                    optimizer.state[p][moment] = _rows_of(files, key, name, layout).to(p.device) if rows else \
                        files[0].read(key, 0, expected[key][0] if expected[key] else 0).to(p.device)
    seconds = state.get("seconds", 0.0)
    return step, float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else 0.0


def _expected_keys(index, shapes: dict[str, tuple], optimizer, directory) -> dict[str, tuple]:
    """{key: whole shape} of every tensor the checkpoint must hold for the trained tensors of whole
    `shapes`: each one, and its optimizer state as the first file lists it (AdamW's moments have
    the tensor's shape)."""
    expected = {f"param.{n}": shape for n, shape in shapes.items()}
    for key, (shape, _) in index.items():
        kind, _, rest = key.partition(".")
        name = rest.partition(".")[2] if kind == "state" else rest
        if kind not in ("param", "state") or name not in shapes or (
                isinstance(optimizer, torch.optim.AdamW) and kind == "state" and shape[1:] != shapes[name][1:]):
            raise unreadable(directory, f"it holds a tensor '{key}' this run does not train")
        if kind == "state":  # a row shard's rows are checked per file; other shapes are whole tensors
            whole = shapes[name]
            expected[key] = whole if shape[1:] == whole[1:] and len(shape) == len(whole) else tuple(shape)
    return expected


class _ShardFile:
    """One file of a checkpoint: its header read and bounded; its sha256 checked before any read."""

    def __init__(self, directory: Path, entry: dict, shards: int, index: int):
        self.directory, self.path, self.shards, self.position = directory, directory / entry["file"], shards, index
        self.index = tensor_index(self.path, directory, entry["bytes"])
        self.sha256, self.handle = entry.get("sha256"), None  # opened once, after the sha256 check

    def rows(self, whole: tuple) -> tuple[int, int]:
        return shard_rows(whole[0], self.shards, self.position) if whole else (0, 0)

    def check(self, expected: dict[str, tuple], shapes: dict[str, tuple]) -> None:
        """Every expected tensor present, holding this file's rows of it; nothing else."""
        if set(self.index) != set(expected):
            missing = sorted(set(expected) - set(self.index)) or sorted(set(self.index) - set(expected))
            what = missing[0].partition(".")[2].partition(".")[2] if missing[0].startswith("state.") \
                else missing[0].partition(".")[2]
            raise unreadable(self.directory, f"it does not hold the trained tensor '{what}' of this shape"
                             if missing[0] in expected else f"it holds a tensor '{missing[0]}' this run does not train")
        for key, whole in expected.items():
            shape, dtype = self.index[key]
            sharded = key.startswith("param.") or whole == shapes[key.split(".", 2)[2]]
            start, stop = self.rows(whole) if sharded else (0, whole[0] if whole else 0)
            want = ((stop - start, *whole[1:]) if whole else ()) if sharded or self.shards == 1 else None
            if want is None or shape != want or dtype is None or not dtype.is_floating_point:
                raise unreadable(self.directory, f"it does not hold the trained tensor "
                                                 f"'{key.partition('.')[2]}' of this shape")

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the file's piece of `key` (row indices within the piece)."""
        from safetensors import safe_open

        try:
            if self.handle is None:
                check_sha256(self.path, self.directory, self.sha256)
                self.handle = safe_open(str(self.path), framework="pt")
            return self.handle.get_slice(key)[start:stop] if self.index[key][0] else self.handle.get_tensor(key)
        except UserError:
            raise
        except Exception as exc:
            raise unreadable(self.directory, f"{self.path.name} cannot be read ({type(exc).__name__})") from None


def _rows_of(files: list[_ShardFile], key: str, name: str, layout: Layout) -> torch.Tensor:
    """This process's rows (`layout`) of the whole tensor `key`, shaped like the trained tensor
    `name`, assembled from the files that hold them."""
    whole = layout.shapes[name]
    if not whole:
        return files[0].read(key, 0, 0)
    start, stop = layout.rows(name)
    pieces = []
    for file in files:
        first, last = file.rows(whole)
        lo, hi = max(start, first), min(stop, last)
        if lo < hi:
            pieces.append(file.read(key, lo - first, hi - first))
    return torch.cat(pieces) if pieces else torch.empty((0, *whole[1:]))


def _agreed_token() -> str:
    """A random file-name token process 0 draws and every process uses."""
    value = torch.tensor([secrets.randbits(31)], dtype=torch.int64, device=parallel.collective_device())
    dist.broadcast(value, src=0)
    return f"{int(value.item()):08x}"


def _shard_name(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index}-of-{shards}.safetensors"


def _gather_entries(entry: dict, prefix: str, shards: int) -> list[dict]:
    """Every process's {"file", "bytes", "sha256"} in process order (each hashed its own file)."""
    mine = torch.tensor([entry["bytes"], *bytes.fromhex(entry["sha256"])], dtype=torch.int64,
                        device=parallel.collective_device())
    every = [torch.empty_like(mine) for _ in range(shards)]
    dist.all_gather(every, mine)
    return [{"file": _shard_name(prefix, i, shards), "bytes": int(t[0].item()),
             "sha256": bytes(t[1:].tolist()).hex()} for i, t in enumerate(every)]
