"""hypercompress.inspect(artifact): what an artifact stores, read through the strict reader (the
library side of `hypercompress inspect`, which only prints it)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import UserError

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
               "I8": 8, "U8": 8, "BOOL": 8}  # every dtype the strict reader lets through


def inspect(artifact_dir: str | Path, warn: Any = None) -> dict[str, Any]:
    """What an artifact stores: per-module and total storage, the run's branches (summary.json) and the
    evaluations kept with it, as `hypercompress inspect` prints it.

    Returns {artifact, architecture, params, safetensors_bytes, safetensors_header_bytes,
    bits_per_weight (model.safetensors bytes x 8 / original parameters), ratio_vs_16bit,
    artifact_bytes, tensor_bits, aliases, recipe, modules (model order: name, kind, params, bits,
    bits_per_weight, layout), branches, protocol, evaluations, lossless}. The artifact is read by the
    same strict reader as `hypercompress.load`, so this refuses (UserError, one line) exactly what
    load refuses; the numbers come from its safetensors header. evaluations.json is not part of the
    sealed artifact: one that cannot be read is one `warn(message)` (default: warnings.warn) and
    left out, never an error."""
    import functools
    import warnings

    from ..modules import represented_weights
    from . import artifact
    from .kept import read_kept

    _, _, verified = artifact.load_verified(artifact_dir, fast=False)
    path, manifest = verified.path, verified.manifest
    shapes = {key: shape for key, (_, shape) in verified.header.items()}
    tensor_bits = {key: math.prod(shape) * _DTYPE_BITS[dtype] for key, (dtype, shape) in verified.header.items()}
    coding = manifest.get("lossless")
    if coding:  # blobs: the stored bits are the coded bytes; shapes are the decoded ones
        shapes = {k: coding["tensors"][k]["shape"] for k in shapes}
    modules = []
    owned: set[str] = set()
    for name, entry in manifest["modules"].items():
        keys = [k for k in tensor_bits if k.startswith(f"{name}.")]
        owned.update(keys)
        layout = entry["layout"]
        params = represented_weights(layout)
        bits = sum(tensor_bits[k] for k in keys)
        modules.append({"name": name, "kind": entry["kind"], "params": params, "bits": bits,
                        "bits_per_weight": bits / params if params else 0.0, "layout": layout})
    for key, bits in tensor_bits.items():
        if key not in owned:
            params = math.prod(shapes[key])
            modules.append({"name": key, "kind": "dense", "params": params, "bits": bits,
                            "bits_per_weight": bits / params if params else 0.0,
                            "layout": {"shape": shapes[key]}})
    weights_bytes = (path / artifact.WEIGHTS).stat().st_size
    params = manifest["original_params"]
    warn = warn or functools.partial(warnings.warn, stacklevel=2)
    return {
        "artifact": str(path),
        "architecture": manifest["architecture"],
        "params": params,
        "safetensors_bytes": weights_bytes,
        "safetensors_header_bytes": safetensors_header_bytes(path / artifact.WEIGHTS),
        "bits_per_weight": weights_bytes * 8 / params,
        "ratio_vs_16bit": 16 / (weights_bytes * 8 / params),
        "artifact_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "tensor_bits": sum(tensor_bits.values()),
        "aliases": manifest["aliases"],
        "recipe": manifest["recipe"],
        "modules": sort_rows(modules, model_order(verified.model.state_dict(keep_vars=True))),
        "branches": _branches(path),
        "protocol": _protocol(path),
        "evaluations": [row.model_dump(exclude_none=True) for row in read_kept(path, warn)],
        "lossless": coding and {"codec": coding["codec"], "level": coding["level"], "report": coding["report"]},
    }



def natural_key(name: str) -> tuple:
    """Sort key reading every all-digit part of a dotted name as a number."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def model_order(state_keys: Iterable[str]) -> dict[str, int]:
    """Every tensor name and every module prefix of `state_keys` -> its first position there."""
    order: dict[str, int] = {}
    for index, key in enumerate(state_keys):
        parts = key.split(".")
        for end in range(1, len(parts) + 1):
            order.setdefault(".".join(parts[:end]), index)
    return order


def sort_rows(rows: Sequence[dict[str, Any]], order: Mapping[str, int]) -> list[dict[str, Any]]:
    """`rows` (each with a "name") in model order; names the model does not hold last, naturally."""
    last = len(order)
    return sorted(rows, key=lambda r: (order.get(r["name"], last), natural_key(r["name"])))



def safetensors_header_bytes(weights: Path) -> int | None:
    """Bytes of a safetensors file before its first tensor byte: the 8-byte length and the JSON
    header it announces (None when the file cannot be read)."""
    try:
        with open(weights, "rb") as handle:
            prefix = handle.read(8)
    except OSError:
        return None
    return 8 + struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None



def _summary(path: Path) -> dict[str, Any]:
    """summary.json if the artifact has one (hashed with it, as every listed file); {} otherwise."""
    from .reader import SUMMARY_JSON, read_document

    file = path / SUMMARY_JSON
    if not file.is_file():
        return {}
    try:
        summary = json.loads(read_document(file))
    except (ValueError, RecursionError):
        raise UserError(f"{file} is not JSON; re-create the artifact") from None
    return summary if isinstance(summary, dict) else {}


def _protocol(path: Path) -> str | None:
    protocol = _summary(path).get("protocol")
    return protocol if isinstance(protocol, str) else None


class _BranchRow(BaseModel):
    """A row of summary.json's branch table as inspect prints it (other fields are ignored)."""

    branch: str
    weights: int
    bytes: int
    bits_per_weight: float
    ratio_vs_16bit: float
    ppl: float | None = None
    kl: float | None = None
    top1: float | None = None


def _branches(path: Path) -> list[dict[str, Any]]:
    from .reader import SUMMARY_JSON

    rows = _summary(path).get("branches", [])
    try:
        return [row.model_dump() for row in TypeAdapter(list[_BranchRow]).validate_python(rows)]
    except ValidationError:
        raise UserError(f"{path / SUMMARY_JSON} has a malformed branch table; re-create the artifact") from None
