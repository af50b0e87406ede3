"""hypercompress inspect ARTIFACT [--json FILE] [--all]: the whole model first (file size, bits per
weight, recipe, quality kept by `evaluate`), then the branches of its run, then its modules grouped
across layers (cli/module_groups.py); sizes as cli/tables.py defines them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..storage.atomic import check_output_file
from ..storage.inspection import inspect as inspect_artifact
from .common import console, one_line_errors, write_json

@one_line_errors
def inspect(
    path: Path = typer.Argument(..., help="artifact directory"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the summary as JSON"),
    all_tensors: bool = typer.Option(False, "--all", help="list every module and dense tensor, one row each"),
) -> None:
    """Show what an artifact stores: the whole model (file size, bits per weight, recipe, kept
    evaluations), its branches, then its modules grouped across layers (--all: one row each)."""
    from ..storage import artifact
    from .tables import print_branch_table

    check_output_file(json_path)  # a folder, or a place nothing can be written: refused before reading
    summary = inspect_artifact(path, warn=lambda message: typer.echo(f"warning: {message}", err=True))
    _print_overview(summary)
    _print_quality(summary)
    if summary["branches"]:
        print_branch_table(console, summary["branches"], summary["params"],
                           Path(summary["artifact"]) / artifact.WEIGHTS, "per branch (summary.json)",
                           summary["protocol"])
    if summary["lossless"]:
        _print_lossless(summary["lossless"])
    _print_modules(summary, all_tensors)
    write_json(json_path, summary)


def _print_overview(summary: dict[str, Any]) -> None:
    """The whole model: its file (the headline size), the artifact folder, the recipe."""
    console.print(f"{summary['artifact']} ({summary['architecture']})")
    console.print(f"  model.safetensors {summary['safetensors_bytes']:,} B (the file, header included)"
                  f" | {summary['params']:,} original params | {summary['bits_per_weight']:.4f} bits per weight"
                  f" | {summary['ratio_vs_16bit']:.2f}x vs 16-bit")
    console.print(f"  artifact {summary['artifact_bytes']:,} B with tokenizer and JSON")
    console.print(f"  recipe: {_recipe_text(summary['recipe'])}")


def _recipe_text(recipe: list[dict[str, Any]]) -> str:
    """'rtn bits=4 group_size=64 -> qat steps=100': each stage's method and settings."""
    stages = []
    for stage in recipe:
        settings = " ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                            for k, v in stage.items() if k != "method")
        stages.append(f"{stage.get('method', '?')} {settings}".strip())
    return " -> ".join(stages) or "(none)"


def _print_quality(summary: dict[str, Any]) -> None:
    """The kept evaluations (newest last), the quality measured at compress time, or how to measure."""
    evaluations, last = summary["evaluations"], (summary["branches"] or [{}])[-1]
    for index, row in enumerate(evaluations, 1):
        console.print(f"  quality [{index}/{len(evaluations)}] {_quality_text(row)}"
                      f" | evaluated {row.get('date', '?')} (evaluations.json)")
        if row.get("protocol"):
            console.print(f"    protocol: {row['protocol']}")
        for name, task in (row.get("tasks") or {}).items():
            console.print(f"    task {name}: {_task_text(task)}")
        if row.get("tasks_protocol"):
            console.print(f"    tasks protocol: {row['tasks_protocol']}")
    if last.get("ppl") is not None:
        console.print(f"  quality at compress time (summary.json, last branch): {_quality_text(last)}")
    if not evaluations and last.get("ppl") is None:
        console.print(f"  quality: not measured; 'hypercompress evaluate {summary['artifact']} --data TEXT' "
                      "keeps it here")


def _quality_text(row: dict[str, Any]) -> str:
    """'ppl 21.34 | KL 0.0512 | top-1 0.9132 | 2,345 tokens/s', '-' for what was not measured."""
    def number(key: str) -> str:
        return f"{row[key]:.4f}" if row.get(key) is not None else "-"

    text = f"ppl {number('ppl')} | KL {number('kl')} | top-1 {number('top1')}"
    return text + (f" | {row['tokens_per_s']:,.0f} tokens/s" if row.get("tokens_per_s") is not None else "")


def _task_text(task: dict[str, Any]) -> str:
    shown = [f"{metric} {value:.4f}" for metric, value in task.items()
             if value is not None and metric not in ("num_fewshot", "docs", "docs_available")
             and not metric.endswith("_stderr")]
    shots, docs = task.get("num_fewshot"), task.get("docs")
    return ", ".join(shown) + f" ({shots if shots is not None else '?'}-shot, {docs if docs is not None else '?'} docs)"


def _print_modules(summary: dict[str, Any], every_row: bool) -> None:
    """Per-module rows grouped across layers (every row with --all), dense tensors as one row unless
    --all; then the note tying their tensor bits to the file."""
    from .module_groups import describe, group_rows
    from .tables import file_note

    table = Table(title="per module (model order; modules alike in several layers grouped, --all lists each)"
                  if not every_row else "per module and tensor (model order)")
    for column in ("module", "storage", "count", "params", "tensor bits", "bpw"):
        table.add_column(column, justify="left" if column in ("module", "storage") else "right")
    modules = [m for m in summary["modules"] if every_row or m["kind"] != "dense"]
    if every_row:
        for row in modules:
            table.add_row(row["name"], describe(row["kind"], row["layout"]), "1", f"{row['params']:,}",
                          f"{row['bits']:,}", f"{row['bits_per_weight']:.3f}")
    else:
        for group in group_rows(modules):
            table.add_row(group.name, group.storage, f"×{len(group.names)}", f"{group.params:,}",
                          f"{group.bits:,}", f"{group.bits_per_weight:.3f}")
        dense = [m for m in summary["modules"] if m["kind"] == "dense"]
        if dense:
            params, bits = sum(m["params"] for m in dense), sum(m["bits"] for m in dense)
            table.add_row(f"{len(dense)} dense tensors (--all lists them)", "dense", f"×{len(dense)}",
                          f"{params:,}", f"{bits:,}", f"{bits / params:.3f}" if params else "-")
    console.print(table)
    header = summary["safetensors_header_bytes"]
    counted = f"tensor bits: stored tensors only, {summary['tensor_bits']:,} in all = {summary['tensor_bits'] // 8:,} B"
    if header is not None and summary["tensor_bits"] // 8 + header == summary["safetensors_bytes"]:
        console.print(f"{counted}; model.safetensors adds its {header:,} B safetensors header")
    elif header is not None:  # the rows do not add up to the file (not expected of a verified artifact)
        note = file_note(summary["safetensors_bytes"], header, summary["params"], summary["tensor_bits"] // 8,
                         "the rows")
        console.print(f"{counted}; {note}")


def _print_lossless(coding: dict[str, Any]) -> None:
    table = Table(title=f"lossless stage: {coding['codec']} (zstd level {coding['level']}), per tensor kind")
    for column in ("kind", "tensors", "raw bytes", "coded bytes", "ratio"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    for kind, row in coding["report"].items():
        table.add_row(kind, str(row["tensors"]), f"{row['raw_bytes']:,}", f"{row['coded_bytes']:,}",
                      f"{row['ratio']:.3f}")
    console.print(table)
