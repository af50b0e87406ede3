"""Checkpoints of a compression run, written crash-safe and read as untrusted input.

Layout of `OUT.checkpoint/`:
  run.json                  {"fingerprint"}: which (model, recipe, calibration) the folder belongs to
  state.json                the layer-wise position: {"block", "bytes", "file", "fingerprint",
                            "format", "modules", "parts", "sha256", "stage"}; "file" names the
                            hidden-states file, "bytes" and "sha256" are that file's size and
                            digest; "parts" lists the module files, each {"file", "bytes", "sha256"}
  tensors-S-B-XXXX.safetensors   the next block's input hidden states
  modules-S-B-XXXX.safetensors   the stored modules new since the pass's previous save (a pass
                            writes each module once: the parts of a 7B run add up to its size,
                            not to its size times the blocks / 2)
  stages.json               {"fingerprint", "rows"}: the report row of every finished pass, by its first
                            stage, so a resumed run that skips a pass still reports it
  stageN/...                whole-model stages' own checkpoints (distill.py writes them, the same
                            way: a tensors file, then a state.json naming it with its size and digest)

A save writes a new tensors file beside the old one, then atomically replaces state.json to point
at it, then deletes the old file: at every instant state.json describes a complete file (a kill
leaves at most an orphan that the next save removes). A load checks everything before using it:
JSON that parses, a file of the recorded size that safetensors opens, the names, shapes and dtypes
a module of the recorded layout holds (built on the meta device, so a corrupt layout allocates
nothing), and the file's sha256 against the recorded one before any tensor is read (a bit flipped
inside a tensor changes no shape); anything else is a UserError that names the fix (remove the
folder). A checkpoint of an earlier version records no digest and is refused the same way.
"""

from __future__ import annotations

import glob
import json
import re
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import parallel
from .reader import file_sha256
from ..layers.build import build_stored
from .atomic import pid_alive, replace_file
from ..errors import UserError
from ..layers import module_kinds
from ..layers.base import StoredModule
from ..modules import replace_module

FORMAT = 3  # 2: state.json records the tensors file's sha256; 3: modules in incremental part files
STATE, RUN, ROWS = "state.json", "run.json", "stages.json"
MAX_JSON_BYTES = 64 * 2**20  # a state.json larger than this is not one of ours
# what tensors.safetensors was called before format 1 (a killed save of that layout could tear it)
LEGACY_TENSORS = "tensors.safetensors"


def fix_hint(directory: Path) -> str:
    return f"remove {directory} (rm -r '{directory}') and run again without --resume to start afresh"


def unreadable(directory: Path, why: str) -> UserError:
    return UserError(f"checkpoint {directory} cannot be resumed: {why}; {fix_hint(directory)}")


def read_json(path: Path, directory: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a UserError (missing, too large, not JSON)."""
    try:
        if not path.is_file():  # a folder or a FIFO would fail, or block the read forever
            raise unreadable(directory, f"{path.name} is missing or not a regular file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise unreadable(directory, f"{path.name} is larger than any checkpoint writes")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise unreadable(directory, f"{path.name} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise unreadable(directory, f"{path.name} is not a JSON object")
    return data


def tensor_index(path: Path, directory: Path, size: int | None = None) -> dict[str, tuple[tuple, torch.dtype]]:
    """{name: (shape, dtype)} of a safetensors file, from its header only (nothing allocated);
    a UserError when the file is missing, not of `size` bytes, or not safetensors."""
    if not path.is_file():
        raise unreadable(directory, f"{path.name} is missing (a run killed while writing it)")
    try:
        actual = path.stat().st_size
    except OSError:
        raise unreadable(directory, f"{path.name} is missing (a run killed while writing it)") from None
    if size is not None and actual != size:
        raise unreadable(directory, f"{path.name} holds {actual} bytes, not the {size} written")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: (tuple(handle.get_slice(name).get_shape()), _dtype(handle.get_slice(name)))
                    for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for any malformed header
        raise unreadable(directory, f"{path.name} is not a valid safetensors file "
                                    f"({type(exc).__name__})") from None


def check_sha256(path: Path, directory: Path, recorded: Any, state: str = STATE) -> None:
    """A UserError unless `path` hashes to `recorded`, the digest `state` holds for it (none
    recorded: a checkpoint of an earlier version, which cannot be verified)."""
    if not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise unreadable(directory, f"{state} records no sha256 of {path.name} (written by an earlier "
                                    "version, it cannot be verified)")
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise unreadable(directory, f"{path.name} cannot be read ({type(exc).__name__})") from None
    if actual != recorded:
        raise unreadable(directory, f"{path.name} does not match the sha256 {state} records for it "
                                    "(changed since it was written)")


def valid_file_name(file: Any) -> bool:
    """A tensors file name a state.json may point at: a .safetensors file inside its folder."""
    return (isinstance(file, str) and "/" not in file and "\\" not in file and file.endswith(".safetensors")
            and not file.startswith("."))


def read_tensors(path: Path, directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of a file `tensor_index` has validated (their sizes are then bounded by
    the file's); a UserError if reading fails."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except Exception as exc:
        raise unreadable(directory, f"{path.name} cannot be read ({type(exc).__name__})") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def _dtype(view) -> torch.dtype | None:
    return _DTYPES.get(view.get_dtype())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write `tensors` (contiguous) as safetensors at `path`, `metadata` in its header."""
    replace_file(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def save_json(path: Path, data: dict[str, Any]) -> None:
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(data, sort_keys=True)))


class Checkpoint:
    """The layer-wise checkpoint of one run in `directory` (see the module docstring)."""

    def __init__(self, directory: Path, fingerprint: str):
        self.dir, self.fingerprint = Path(directory), fingerprint

    def stage_dir(self, stage: int) -> Path:
        """Where whole-model stage `stage` keeps its own checkpoint."""
        return self.dir / f"stage{stage}"

    def start(self, resume: bool) -> None:
        """Before any stage: on resume, refuse a folder of another run (or one that cannot be read);
        a fresh run removes the folder (its first checkpoint write `claim`s it again)."""
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(describe_leftover(self.dir))
        if resume and self.dir.exists():
            owner = self._owner()
            if owner is not None and owner != self.fingerprint:
                raise UserError(f"checkpoint {self.dir} belongs to another model, recipe or calibration; "
                                "remove it or run without --resume")
        if not resume:
            self.remove()

    def claim(self) -> None:
        """Create the folder, marked as this run's (run.json), unless it exists; process 0 only."""
        if parallel.is_main():
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if not (self.dir / RUN).is_file():
                    save_json(self.dir / RUN, {"fingerprint": self.fingerprint})
            except OSError as exc:
                raise UserError(f"cannot write the checkpoint {self.dir} ({exc.strerror}); "
                                "pass an --out path in a writable folder") from None

    def _owner(self) -> str | None:
        for name in (RUN, STATE):
            if (self.dir / name).is_file():
                return read_json(self.dir / name, self.dir).get("fingerprint")
        return None

    def record_row(self, stage: int, row: dict[str, Any]) -> None:
        """Keep finished pass `stage`'s report row (ROWS), so that a resumed run that skips the pass
        reports it as an uninterrupted run does; process 0 only."""
        if not parallel.is_main():
            return
        self.claim()
        rows = self.rows()
        rows[stage] = json.loads(json.dumps(row, default=str))
        save_json(self.dir / ROWS, {"fingerprint": self.fingerprint, "rows": {str(k): v for k, v in rows.items()}})

    def rows(self) -> dict[int, dict[str, Any]]:
        """{stage: report row} of the passes this run finished (checked; {} when none were kept)."""
        if not (self.dir / ROWS).exists():
            return {}
        data = read_json(self.dir / ROWS, self.dir)
        rows = data.get("rows")
        if data.get("fingerprint") != self.fingerprint or not isinstance(rows, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, dict) and v.get("stage") == int(k)
                for k, v in rows.items()):
            raise unreadable(self.dir, f"{ROWS} does not hold this run's stage rows")
        return {int(k): v for k, v in rows.items()}

    def stage(self) -> int | None:
        """The stage of the saved layer-wise position, or None when there is none (checked)."""
        if not (self.dir / STATE).exists():
            return None
        state = read_json(self.dir / STATE, self.dir)
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"checkpoint {self.dir} belongs to another model, recipe or calibration; "
                            "remove it or run without --resume")
        if not _is_index(state.get("stage")):
            raise unreadable(self.dir, f"{STATE} records no valid stage")
        return state["stage"]

    def save(self, model: nn.Module, stage: int, block: int, hiddens: list[torch.Tensor]) -> None:
        """Record that `stage` finished `block`: every stored module (layout + tensors) and the
        next block's inputs `hiddens`. Crash-safe (see the module docstring). Incremental: the
        modules an earlier save of this pass wrote (the same objects) stay in their part files;
        only the new ones are written, so a pass writes each module once (not once per block)."""
        if not parallel.is_main():  # under a launcher, process 0 alone writes (all hold the same)
            return
        stored = stored_modules(model)
        memo = getattr(self, "_memo", None)
        if memo is None or memo["stage"] != stage or any(stored.get(n) is not m for n, m in memo["saved"].items()):
            memo = self._memo = {"stage": stage, "saved": {}, "parts": []}
        new = {n: m for n, m in stored.items() if n not in memo["saved"]}
        self.claim()
        shutil.rmtree(self.dir.with_name(self.dir.name + ".tmp"), ignore_errors=True)  # older versions'
        tag = f"{stage}-{block}-{secrets.token_hex(4)}"
        parts = list(memo["parts"])
        if new:
            prefixes = tuple(f"{n}." for n in new)
            tensors = {f"module.{k}": v.detach() for k, v in model.state_dict().items() if k.startswith(prefixes)}
            part = f"modules-{tag}.safetensors"
            save_tensors(self.dir / part, tensors)
            parts.append({"file": part, "bytes": (self.dir / part).stat().st_size,
                          "sha256": file_sha256(self.dir / part)})
        file = f"tensors-{tag}.safetensors"
        save_tensors(self.dir / file, {f"hidden.{i}": h for i, h in enumerate(hiddens)})
        modules = {name: {"kind": m.kind, "layout": m.layout()} for name, m in stored.items()}
        state = {"fingerprint": self.fingerprint, "stage": stage, "block": block, "modules": modules,
                 "file": file, "bytes": (self.dir / file).stat().st_size, "parts": parts,
                 "sha256": file_sha256(self.dir / file), "format": FORMAT}
        save_json(self.dir / STATE, state)  # the switch to the new checkpoint: one atomic rename
        memo["saved"].update(new)
        memo["parts"] = parts
        remove_stale(self.dir, "tensors*.safetensors", file)
        remove_stale(self.dir, "modules*.safetensors", *(p["file"] for p in parts))

    def load(self, model: nn.Module) -> tuple[int, int, list[torch.Tensor]] | None:
        """Restore the stored modules into `model`; returns (stage, block, hiddens) or None when
        no layer-wise position was saved. Raises UserError for a checkpoint of another run or one
        that cannot be read (torn, truncated, edited); `model` is then left as it was."""
        if self.stage() is None:
            return None
        state = read_json(self.dir / STATE, self.dir)
        stage, block, modules, file = (state.get(k) for k in ("stage", "block", "modules", "file"))
        file = LEGACY_TENSORS if file is None and "format" not in state else file
        if not (_is_index(block) and isinstance(modules, dict) and valid_file_name(file)):
            raise unreadable(self.dir, f"{STATE} lacks a valid block, modules or file entry")
        parts = state.get("parts", [])
        if not isinstance(parts, list) or not all(isinstance(p, dict) and valid_file_name(p.get("file"))
                                                  for p in parts):
            raise unreadable(self.dir, f"{STATE} lists its module files wrongly (parts)")
        files = [(p["file"], p.get("bytes"), p.get("sha256")) for p in parts]
        files.append((file, state.get("bytes"), state.get("sha256")))
        indexes = {name: tensor_index(self.dir / name, self.dir, size if _is_index(size) else None)
                   for name, size, _ in files}
        index = {k: v for entries in indexes.values() for k, v in entries.items()}
        if len(index) != sum(len(entries) for entries in indexes.values()):
            raise unreadable(self.dir, "a tensor is in two of its files")
        expected = {}
        for name, entry in modules.items():
            expected.update(self._expected(name, entry, model))
        count = sum(1 for k in index if k.startswith("hidden."))
        hidden_names = [f"hidden.{i}" for i in range(count)]
        module_names = [k for k in index if not k.startswith("hidden.")]
        if set(module_names) != set(expected) or set(index) != set(hidden_names) | set(expected):
            odd = sorted((set(index) - set(hidden_names)) ^ set(expected))[0]
            raise unreadable(self.dir, f"{file} does not match {STATE} (tensor '{odd}')")
        wrong = next((k for k in expected if index[k] != expected[k]), None)
        if wrong is not None:
            raise unreadable(self.dir, f"tensor '{wrong}' has the wrong shape or dtype")
        for name, _, digest in files:
            check_sha256(self.dir / name, self.dir, digest)  # before any tensor is read
        tensors = {}
        for name in indexes:
            tensors.update(read_tensors(self.dir / name, self.dir, sorted(indexes[name])))
        for name, entry in modules.items():  # outer modules first (the order they were saved in)
            replace_module(model, name, build_stored(entry, f"module {name}", device="cpu"))
        model.load_state_dict({k[len("module."):]: tensors[k] for k in expected}, strict=False)
        for module in model.modules():  # a tied head, latent K/V, generated layers: re-link
            if isinstance(module, StoredModule) and hasattr(module, "bind"):
                module.bind(model)
        return stage, block, [tensors[n] for n in hidden_names]

    def _expected(self, name: str, entry: Any, model: nn.Module) -> dict[str, tuple]:
        """{"module.NAME.KEY": (shape, dtype)} of the module `entry` describes, built on the meta
        device (a corrupt layout allocates nothing); a UserError for anything our writer never wrote."""
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in module_kinds() or not isinstance(entry.get("layout"), dict):
            raise unreadable(self.dir, f"module '{name}' has no known kind and layout")
        parent = name.rpartition(".")[0]
        try:
            if parent:
                model.get_submodule(parent)
        except AttributeError:
            raise unreadable(self.dir, f"module '{name}' is not in the model") from None
        try:  # the artifact reader's layout checks, built on the meta device
            built = build_stored(entry, f"module {name}")
            return {f"module.{name}.{k}": (tuple(v.shape), v.dtype) for k, v in built.state_dict().items()}
        except UserError as exc:  # any layout our writer did not produce
            raise unreadable(self.dir, f"module '{name}' has an invalid layout ({str(exc).split(';')[0]})") from None

    def remove(self) -> None:
        if parallel.is_main():
            discard(self.dir)


def remove_stale(directory: Path, pattern: str, *keep: str) -> None:
    """After a save switched state.json to the files `keep`: delete the other files of `pattern`
    and the temporary files of writers killed mid-write."""
    for old in directory.glob(pattern):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    for orphan in directory.glob(".*.tmp-*"):
        pid = orphan.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            orphan.unlink(missing_ok=True)


def discard(directory: Path) -> None:
    """Remove a checkpoint folder without ever leaving a torn one under its name: it is first
    renamed to a hidden `.NAME.removed-PID` (atomic), then deleted."""
    directory = Path(directory)
    trash = directory.with_name(f".{directory.name}.removed-{os.getpid()}")
    try:
        os.replace(directory, trash)
    except FileNotFoundError:
        trash = None
    except OSError:
        trash = directory  # e.g. a non-empty trash of this pid: delete in place
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    for left in directory.parent.glob(f".{glob.escape(directory.name)}.removed-*"):  # by killed removals
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)


def stored_modules(model: nn.Module) -> dict[str, StoredModule]:
    """Every stored module (compressed linears, embeddings, generators) by name, outer ones first."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StoredModule)}


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def describe_leftover(directory: Path) -> str:
    """The refusal of a fresh run while `directory` (a checkpoint folder) exists: how to continue
    it, or, when it cannot be read, how to get rid of it."""
    if not directory.is_dir():
        return f"{directory} is in the way of this run's checkpoint folder; remove or rename it"
    try:
        state = read_json(directory / STATE, directory) if (directory / STATE).exists() else None
        if state is not None:
            parts = state.get("parts") if isinstance(state.get("parts"), list) else []
            names = [str(state.get("file", LEGACY_TENSORS))] + [str(p.get("file")) for p in parts if isinstance(p, dict)]
            if not all((directory / name).is_file() for name in names):
                raise unreadable(directory, "one of its tensors files is missing (a run killed while writing it)")
    except UserError as exc:
        return str(exc)
    return (f"{directory} holds an unfinished run; pass --resume to continue it, or "
            f"remove it (rm -r '{directory}') to start afresh")
