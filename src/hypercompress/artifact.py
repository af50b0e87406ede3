"""Artifacts: a directory of HF config + tokenizer, model.safetensors and hypercompress.json.

The format is specified in docs/FORMAT.md. Saving writes to a temporary directory beside the target
and renames it; loading rebuilds the model skeleton without allocating dense weights, swaps in the
recorded compressed modules, checks version, sha256 of every file and every tensor's shape, and
reads tensors with safetensors only (nothing is ever unpickled).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import arch_of
from .atomic import atomic_directory
from .errors import UserError
from .formats import lossless as lossless_codec
from .hf_integration import MODEL_TYPE, base_config_of, wrapper_config
from .kernels import prepare_model
from .layers import module_kinds
from .modules import StoredModule, replace_module

FORMAT_VERSION = 1
MANIFEST = "hypercompress.json"
WEIGHTS = "model.safetensors"
STORAGE_DTYPE = torch.float16  # dtype of every tensor no method compressed


def compressed_modules(model: nn.Module) -> dict[str, StoredModule]:
    """Modules saved by kind (compressed linears, embeddings, generators), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StoredModule)}


def tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors an artifact stores, and the aliases (tied names -> stored name).

    Compressed modules' tensors are kept as they are; other floating tensors are stored as float16;
    a tensor reachable under two names (tied embeddings) is stored once.
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
        if tensor.is_floating_point() and not name.startswith(prefixes):
            tensor = tensor.to(STORAGE_DTYPE)
        tensors[name] = tensor.contiguous().cpu()
    return tensors, aliases


@torch.no_grad()
def round_to_storage(model: nn.Module) -> None:
    """Round every tensor outside compressed modules to STORAGE_DTYPE precision, in place, so that
    the model in memory computes exactly what its artifact will (its compute dtype is kept)."""
    prefixes = tuple(f"{n}." for n in compressed_modules(model))
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and not name.startswith(prefixes):
            tensor.data.copy_(tensor.data.to(STORAGE_DTYPE).to(tensor.dtype))


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
    out = Path(out_dir).expanduser()
    with atomic_directory(out) as tmp:
        tensors, aliases = tensors_to_save(model)
        stored, coding = tensors, None
        if lossless is not None:
            if not 1 <= lossless <= 22:
                raise UserError(f"lossless level {lossless}: zstd levels are 1..22")
            stored, coding = lossless_tensors(model, tensors, lossless)
        save_file(stored, str(tmp / WEIGHTS), metadata={"format": "pt"})
        wrapper_config(model.config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (documents((tmp / WEIGHTS).stat().st_size) if documents else {}).items():
            (tmp / name).write_text(text)
        bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
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
            "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())},
            "totals": {
                "tensor_bits": bits,
                "safetensors_bytes": (tmp / WEIGHTS).stat().st_size,
                "bits_per_weight": (tmp / WEIGHTS).stat().st_size * 8 / original_params,
            },
            **({"lossless": coding} if coding else {}),
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and check an artifact's manifest and file hashes (without loading any tensor)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"artifact not found: {path}; pass a directory written by 'hypercompress compress'")
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} has no {MANIFEST}: not a hypercompress artifact")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        version = manifest["format_version"]
        files = manifest["files"]
        manifest["modules"], manifest["aliases"], manifest["original_params"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path / MANIFEST} is corrupt (not the expected JSON); re-create the artifact") from None
    if version != FORMAT_VERSION:
        raise UserError(f"artifact format version {version} is not supported (this hypercompress reads "
                        f"{FORMAT_VERSION}); re-create the artifact or upgrade hypercompress")
    if WEIGHTS not in files:
        raise UserError(f"{path / MANIFEST} lists no {WEIGHTS}; re-create the artifact")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"artifact file {file} is missing; re-create the artifact")
        if _sha256(file) != digest:
            raise UserError(f"artifact file {file} fails its sha256 check (corrupt or tampered); "
                            "re-create the artifact")
    return manifest


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         fast: bool = True, workload: str = "decode") -> tuple[nn.Module, Any]:
    """Load an artifact: (model on `device` in eval mode, tokenizer). Compressed modules stay
    compressed; with `fast` each takes the fastest exact kernel `device` has for `dtype` (the
    int4 CUDA kernel wants bfloat16), and `model.hypercompress_backends` says which (kernels/).
    `fast=False` keeps every module on its reference forward (dequantize, then a dense GEMM);
    `workload` "prefill" prefers kernels for long inputs (kernels.prepare_model).
    Raises UserError for a missing, corrupt or tampered artifact, or a device torch cannot use."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    config = read_config(path)
    arch_of(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, entry in manifest["modules"].items():
        if entry.get("kind") not in module_kinds():
            raise UserError(f"artifact module {name} has unknown kind {entry.get('kind')!r}; "
                            "upgrade hypercompress or re-create the artifact")
        replace_module(model, name, module_kinds()[entry["kind"]].from_layout(entry["layout"]))
    tensors = _read_tensors(path / WEIGHTS)
    if "lossless" in manifest:
        tensors = _decode_lossless(tensors, manifest["lossless"], path)
    _check_tensors(model, tensors, manifest["aliases"], path)
    prefixes = tuple(f"{n}." for n in manifest["modules"])
    for name, tensor in tensors.items():  # dense tensors to the compute dtype; codes stay as stored
        if tensor.is_floating_point() and not name.startswith(prefixes):
            tensors[name] = tensor.to(dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for alias, source in manifest["aliases"].items():
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, _get_tensor(model, source))
    for module in model.modules():
        if hasattr(module, "bind"):
            module.bind(model)
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    model.eval().requires_grad_(False)
    model.to(resolve_device(device))
    model.hypercompress_backends = prepare_model(model, dtype, workload) if fast else {}
    return model, AutoTokenizer.from_pretrained(path)


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


def read_config(path: Path):
    """The source model's config of an artifact: config.json's base_config (the wrapper that
    hf_integration.py describes), or config.json itself for artifacts written before it."""
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{path / 'config.json'} is missing or not JSON; re-create the artifact") from None
    if isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE:
        return base_config_of(raw.get("base_config"))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path / 'config.json'} is not a readable config ({exc}); re-create the artifact") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file} is not a readable safetensors file ({exc}); re-create the artifact") from None


def _decode_lossless(blobs: dict[str, torch.Tensor], coding: Any, path: Path) -> dict[str, torch.Tensor]:
    try:
        codec, entries = coding["codec"], coding["tensors"]
    except (TypeError, KeyError):
        raise UserError(f"{path / MANIFEST} has a corrupt 'lossless' entry; re-create the artifact") from None
    if codec != lossless_codec.CODEC:
        raise UserError(f"artifact {path} is coded with {codec!r}, which this hypercompress does not read; "
                        "upgrade hypercompress or re-create the artifact")
    if set(entries) != set(blobs):
        raise UserError(f"artifact {path}: coded tensors do not match the manifest; re-create the artifact")
    return {name: lossless_codec.decode(blob, entries[name], name) for name, blob in blobs.items()}


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                   path: Path) -> None:
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in aliases}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        raise UserError(f"artifact {path} does not match its manifest ({what}); re-create the artifact")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"artifact tensor {name} has shape {tuple(tensor.shape)}, expected "
                            f"{tuple(expected[name].shape)}; re-create the artifact")


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
