"""hypercompress inspect ARTIFACT [--json FILE]: per-module kind, params, bits; totals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.table import Table

from ..errors import UserError
from .common import console, one_line_errors, write_json

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
               "I8": 8, "U8": 8, "BOOL": 8}  # every dtype the strict reader lets through


def artifact_summary(path: Path) -> dict[str, Any]:
    """Per-module and total storage of an artifact. The artifact is loaded through the same strict
    reader as `hypercompress.load` (so inspect refuses exactly what load refuses); the numbers come
    from its safetensors header."""
    from .. import artifact
    from ..modules import represented_weights

    _, _, verified = artifact.load_verified(path, fast=False)
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
    return {
        "artifact": str(path),
        "architecture": manifest["architecture"],
        "params": params,
        "safetensors_bytes": weights_bytes,
        "bits_per_weight": weights_bytes * 8 / params,
        "ratio_vs_16bit": 16 / (weights_bytes * 8 / params),
        "artifact_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "tensor_bits": sum(tensor_bits.values()),
        "aliases": manifest["aliases"],
        "recipe": manifest["recipe"],
        "modules": modules,
        "branches": _branches(path),
        "protocol": _protocol(path),
        "lossless": coding and {"codec": coding["codec"], "level": coding["level"], "report": coding["report"]},
    }


@one_line_errors
def inspect(
    path: Path = typer.Argument(..., help="artifact directory"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the summary as JSON"),
    all_tensors: bool = typer.Option(False, "--all", help="list every dense tensor too"),
) -> None:
    """Show what an artifact stores: per-module kind, params, bits; whole-model bits per weight."""
    if json_path is not None and json_path.is_dir():
        raise UserError(f"--json {json_path} is a directory; pass a file path such as {json_path / 'inspect.json'}")
    summary = artifact_summary(path)
    table = Table(title=f"{summary['artifact']} ({summary['architecture']})")
    for column in ("module", "kind", "params", "bits", "bpw"):
        table.add_column(column, justify="right" if column != "module" else "left")
    dense = [m for m in summary["modules"] if m["kind"] == "dense"]
    for row in summary["modules"]:
        if row["kind"] != "dense" or all_tensors:
            table.add_row(row["name"], row["kind"], f"{row['params']:,}", f"{row['bits']:,}",
                          f"{row['bits_per_weight']:.3f}")
    if dense and not all_tensors:
        params, bits = sum(m["params"] for m in dense), sum(m["bits"] for m in dense)
        table.add_row(f"{len(dense)} dense tensors (--all lists them)", "dense", f"{params:,}",
                      f"{bits:,}", f"{bits / params:.3f}")
    console.print(table)
    if summary["lossless"]:
        _print_lossless(summary["lossless"])
    if summary["branches"]:
        _print_branches(summary["branches"], summary["protocol"])
    console.print(
        f"original params {summary['params']:,} | model.safetensors {summary['safetensors_bytes']:,} B"
        f" | {summary['bits_per_weight']:.4f} bits per weight | {summary['ratio_vs_16bit']:.2f}x vs 16-bit"
        f" | artifact {summary['artifact_bytes']:,} B with tokenizer and JSON"
    )
    write_json(json_path, summary)


def _print_lossless(coding: dict[str, Any]) -> None:
    table = Table(title=f"lossless stage: {coding['codec']} (zstd level {coding['level']}), per tensor kind")
    for column in ("kind", "tensors", "raw bytes", "coded bytes", "ratio"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    for kind, row in coding["report"].items():
        table.add_row(kind, str(row["tensors"]), f"{row['raw_bytes']:,}", f"{row['coded_bytes']:,}",
                      f"{row['ratio']:.3f}")
    console.print(table)


def _summary(path: Path) -> dict[str, Any]:
    """summary.json if the artifact has one (hashed with it, as every listed file); {} otherwise."""
    from ..artifact_reader import read_document
    from ..summary import SUMMARY_JSON

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
    from ..summary import SUMMARY_JSON

    rows = _summary(path).get("branches", [])
    try:
        return [row.model_dump() for row in TypeAdapter(list[_BranchRow]).validate_python(rows)]
    except ValidationError:
        raise UserError(f"{path / SUMMARY_JSON} has a malformed branch table; re-create the artifact") from None


def _print_branches(branches: list[dict[str, Any]], protocol: str | None) -> None:
    table = Table(title="per branch (summary.json)")
    for column in ("branch", "weights", "bytes", "bpw", "ratio", "ppl", "KL", "top-1"):
        table.add_column(column, justify="left" if column == "branch" else "right")
    for r in branches:
        quality = [f"{r[k]:.4g}" if r.get(k) is not None else "-" for k in ("ppl", "kl", "top1")]
        table.add_row(r["branch"], f"{r['weights']:,}", f"{r['bytes']:,}", f"{r['bits_per_weight']:.4f}",
                      f"{r['ratio_vs_16bit']:.2f}x", *quality)
    console.print(table)
    if protocol:
        console.print(f"quality: {protocol}")
