"""Artifacts: a directory of HF config + tokenizer, model.safetensors and hypercompress.json.

The format is specified in docs/FORMAT.md. Saving writes to a temporary directory beside the target
and renames it; every stored value is finite, and a dense tensor beyond float16's range is stored as
float32 (recorded, and counted). Loading goes through the strict reader (storage/reader.py): every
field is checked against the others and the config before a tensor is read with safetensors
(nothing is ever unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .reader import (FORMAT_VERSION, MANIFEST, WEIGHTS, Verified, file_sha256, read_config,
                              verify)
from .atomic import atomic_directory
from ..layers.build import build_stored
from ..errors import UserError, user_path
from ..formats import lossless as lossless_codec
from .hf_config import wrapper_config
from ..kernels import prepare_model
from ..kernels.decode import use_fast_decode
from ..layers.base import StoredModule
from ..modules import guard_plain_saves, replace_module

__all__ = ["FORMAT_VERSION", "MANIFEST", "WEIGHTS", "load", "read_config", "read_manifest", "save"]
STORAGE_DTYPE = torch.float16  # dtype of every tensor no method compressed
FLOAT16_MAX = torch.finfo(torch.float16).max


def compressed_modules(model: nn.Module) -> dict[str, StoredModule]:
    """Modules saved by kind (compressed linears, embeddings, generators), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StoredModule)}


def tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors an artifact stores, and the aliases (tied names -> stored name).

    Compressed modules' tensors are kept as they are; other floating tensors are stored as float16,
    or float32 where a value lies beyond float16's range (dense_storage_dtype); a tensor reachable
    under two names (tied embeddings) is stored once. Raises UserError naming a tensor that holds
    inf or nan.
    """
    prefixes = tuple(f"{n}." for n in compressed_modules(model))
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        tensor = tensor.detach()
        if tensor.is_floating_point():
            _refuse_non_finite(name, tensor, compressed=name.startswith(prefixes))
            if not name.startswith(prefixes):
                tensor = tensor.to(dense_storage_dtype(tensor))
        tensors[name] = tensor if tensor.device.type == "meta" else tensor.contiguous().cpu()  # (meta: counted only)
    return tensors, aliases


def dense_storage_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float16 (STORAGE_DTYPE), or float32 for a tensor with a value float16 cannot hold (|x| > 65504:
    the cast would give inf). The manifest's `dense_dtypes` names those, and their bytes are counted.
    A tensor still on disk (meta device: a streamed model mid-run) is counted at float16 until read."""
    if tensor.numel() and tensor.device.type != "meta" and float(tensor.detach().abs().max()) > FLOAT16_MAX:
        return torch.float32
    return STORAGE_DTYPE


def _refuse_non_finite(name: str, tensor: torch.Tensor, compressed: bool) -> None:
    if tensor.numel() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor.detach()).all()):
        where = "a compressed module's stored tensor (a value beyond its float16 grid?)" if compressed else \
            "the model's tensor"
        raise UserError(f"{where} {name} holds inf or nan, which an artifact never stores; check the source "
                        "model (its weights must be finite) or compress this layer with another method")


@torch.no_grad()
def round_to_storage(model: nn.Module) -> None:
    """Round every tensor outside compressed modules to STORAGE_DTYPE precision, in place, so that
    the model in memory computes exactly what its artifact will (its compute dtype is kept)."""
    prefixes = tuple(f"{n}." for n in compressed_modules(model))
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and not name.startswith(prefixes):
            tensor.data.copy_(tensor.data.to(dense_storage_dtype(tensor.data)).to(tensor.dtype))


def storage_bits(model: nn.Module) -> int:
    """Bits of every tensor the artifact would store: the model's size, counted from tensors."""
    tensors, _ = tensors_to_save(model)
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


def tensor_kind(model_modules: dict[str, StoredModule], name: str) -> str:
    """'KIND.LEAF' of a stored tensor (e.g. quant.qweight, lowrank.U), 'dense.DTYPE' outside modules."""
    owner = max((n for n in model_modules if name.startswith(f"{n}.")), key=len, default=None)
    if owner is None:
        return "dense"
    return f"{model_modules[owner].kind}.{name[len(owner) + 1:].split('.')[-1]}"


def lossless_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], level: int
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor byte-grouped and zstd-coded (formats/lossless.py): (blobs, the manifest entry with
    each tensor's dtype/shape/planes and the lossless ratio per tensor kind)."""
    modules = compressed_modules(model)
    blobs, entries, report = {}, {}, {}
    for name, tensor in tensors.items():
        blobs[name], entries[name] = lossless_codec.encode(tensor, level)
        kind = tensor_kind(modules, name)
        kind = f"dense.{entries[name]['dtype']}" if kind == "dense" else kind
        row = report.setdefault(kind, {"tensors": 0, "raw_bytes": 0, "coded_bytes": 0})
        row["tensors"] += 1
        row["raw_bytes"] += tensor.numel() * tensor.element_size()
        row["coded_bytes"] += blobs[name].numel()
    for row in report.values():
        row["ratio"] = row["raw_bytes"] / max(row["coded_bytes"], 1)
    return blobs, {"codec": lossless_codec.CODEC, "level": level, "tensors": entries,
                   "report": dict(sorted(report.items()))}


def stored_bytes(model: nn.Module, lossless: int | None = None) -> int:
    """Exact size of the model.safetensors `save` would write (header included), without writing."""
    from safetensors.torch import save as serialize

    tensors, _ = tensors_to_save(model)
    if lossless is not None:
        tensors, _ = lossless_tensors(model, tensors, lossless)
    return len(serialize(tensors, metadata={"format": "pt"}))


def save(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, recipe: list[dict[str, Any]],
         original_params: int, extra: dict[str, Any] | None = None, lossless: int | None = None,
         documents: Callable[[int], dict[str, str]] | None = None) -> Path:
    """Write the artifact atomically; refuses an existing non-empty `out_dir`. `lossless` (a zstd
    level, 1..22) stores every tensor byte-grouped and zstd-coded; the bytes counted are the coded ones.
    `documents(safetensors_bytes)` returns text files (name -> content, e.g. the summary) written
    into the artifact and hashed with it."""
    out = user_path(out_dir)
    with atomic_directory(out) as tmp:
        tensors, aliases = tensors_to_save(model)
        stored, coding = tensors, None
        if lossless is not None:
            if not 1 <= lossless <= 22:
                raise UserError(f"lossless level {lossless}: zstd levels are 1..22; pass one of them")
            stored, coding = lossless_tensors(model, tensors, lossless)
        save_file(stored, str(tmp / WEIGHTS), metadata={"format": "pt"})
        wrapper_config(model.config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (documents((tmp / WEIGHTS).stat().st_size) if documents else {}).items():
            (tmp / name).write_text(text)
        bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
        prefixes = tuple(f"{n}." for n in compressed_modules(model))
        wider = {n: "float32" for n, t in tensors.items() if t.dtype == torch.float32 and not n.startswith(prefixes)}
        manifest = {
            "format": "hypercompress",
            "format_version": FORMAT_VERSION,
            "architecture": model.config.model_type,
            "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
            "original_params": original_params,
            "recipe": recipe,
            "modules": {n: {"kind": m.kind, "layout": m.layout()}
                        for n, m in compressed_modules(model).items()},
            "aliases": aliases,
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())},
            "totals": {
                "tensor_bits": bits,
                "safetensors_bytes": (tmp / WEIGHTS).stat().st_size,
                "bits_per_weight": (tmp / WEIGHTS).stat().st_size * 8 / original_params,
            },
            **({"lossless": coding} if coding else {}),
            **({"dense_dtypes": wider} if wider else {}),
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact that passed every structural check and hash (reader.verify)."""
    return verify(path).manifest


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         fast: bool = True, workload: str = "decode") -> tuple[nn.Module, Any]:
    """Load an artifact: (model on `device` in eval mode, tokenizer). Compressed modules stay
    compressed; with `fast` each takes the fastest exact kernel `device` has for `dtype` (the
    int4 CUDA kernel wants bfloat16), and `model.hypercompress_backends` says which (kernels/).
    `fast=False` keeps every module on its reference forward (dequantize, then a dense GEMM);
    `workload` "prefill" prefers kernels for long inputs (kernels.prepare_model). On CUDA with
    `fast`, `generate` decodes with a static KV cache and a compiled step (kernels/decode.py).
    Every field is checked before a tensor is read (storage/reader.py); memory: the weights file
    plus the model. Nothing is unpickled and no code from the artifact runs.
    Raises UserError for a missing, corrupt, inconsistent or tampered artifact, or a device torch
    cannot use."""
    model, tokenizer, _ = load_verified(path, dtype, device, fast, workload)
    return model, tokenizer


def load_verified(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  fast: bool = True, workload: str = "decode") -> tuple[nn.Module, Any, Verified]:
    """`load`, also returning what the reader verified (manifest, config, safetensors header)."""
    from transformers import AutoTokenizer

    verified = verify(path)
    path, manifest, model = verified.path, verified.manifest, verified.model
    for name, entry in manifest["modules"].items():  # the verified layouts, now built for real
        if not isinstance(model.get_submodule(name.rpartition(".")[0]), StoredModule):  # bases come with their wrapper
            replace_module(model, name, build_stored(entry, f"module {name}", path, device="cpu"))
    tensors = _read_tensors(path / WEIGHTS)
    if manifest.get("lossless"):
        entries = manifest["lossless"]["tensors"]
        tensors = {name: lossless_codec.decode(blob, entries[name], name) for name, blob in tensors.items()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"artifact tensor {name} holds inf or nan (corrupt or tampered); re-create the artifact")
    prefixes = tuple(f"{n}." for n in manifest["modules"])
    for name, tensor in tensors.items():  # dense tensors to the compute dtype; codes stay as stored
        if tensor.is_floating_point() and not name.startswith(prefixes):
            tensors[name] = tensor.to(dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for alias, source in manifest["aliases"].items():
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, _get_tensor(model, source))
    try:
        for name, module in model.named_modules():
            problem = module.check_stored() if isinstance(module, StoredModule) else None
            if problem:
                raise UserError(f"artifact {path}: module {name} is inconsistent ({problem}); re-create the artifact")
            if hasattr(module, "bind"):
                module.bind(model)
            if hasattr(module, "compute_dtype"):
                module.compute_dtype = dtype
        model.eval().requires_grad_(False)
        _smoke_forward(model, path)
    except UserError:
        raise
    except Exception as exc:  # modules that pass every check alone but not together (a tampered source)
        raise UserError(f"artifact {path}: its modules do not work together ({type(exc).__name__}: "
                        f"{_first_line(exc)}); re-create the artifact") from None
    model.to(resolve_device(device))
    model.hypercompress_backends = prepare_model(model, dtype, workload) if fast else {}
    if fast:
        use_fast_decode(model)
    guard_plain_saves(model)
    model.hypercompress_source = {"original_params": manifest["original_params"], "recipe": manifest["recipe"]}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # files transformers parses; hashed, so only a resealed edit gets here
        raise UserError(f"artifact {path}: its tokenizer does not load ({type(exc).__name__}); "
                        "re-create the artifact") from None
    return model, tokenizer, verified


@torch.no_grad()
def _smoke_forward(model: nn.Module, path: Path) -> None:
    """One forward on two tokens, on the CPU: every module bound and shaped right, and finite logits
    (a config edit such as rms_norm_eps NaN gives NaN everywhere)."""
    logits = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=False).logits
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"artifact {path}: its logits on two tokens are not finite (a corrupt config or "
                        "tensor); re-create the artifact")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has, or a UserError naming the fix."""
    try:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        torch.empty(0, device=device)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"device {device!s}: {first}; pass --device cpu or a device this machine has") from None
    return device


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file} is not a readable safetensors file ({exc}); re-create the artifact") from None


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)
