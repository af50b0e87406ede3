"""Size tables shared by `compress` and `inspect`, with one size definition on screen.

The headline size of a model is its file: model.safetensors in bytes, header included, x 8 /
original parameters = bits per weight (the manifest's totals). A branch of a run (summary.json's
rows) or a module counts only its tensors: those columns say "tensor bytes" / "tensor bits", and a
note under the table names the difference, `file = tensor bytes + N B safetensors header`, so the
last branch row and the file agree or the gap is named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from ..storage.inspection import safetensors_header_bytes


def file_note(file_bytes: int, header_bytes: int, params: int, counted: int | None = None,
              what: str = "the last branch") -> str:
    """One line: the file = its tensor bytes + the safetensors header, with its bits per weight and
    ratio; `counted` (tensor bytes a table shows for `what`) is named when it differs."""
    tensor_bytes, bpw = file_bytes - header_bytes, file_bytes * 8 / params
    line = (f"model.safetensors {file_bytes:,} B = {tensor_bytes:,} tensor bytes + {header_bytes:,} B "
            f"safetensors header: {bpw:.4f} bits per weight, {16 / bpw:.2f}x vs 16-bit")
    if counted is not None and counted != tensor_bytes:
        line += f" ({what} counts {counted:,} tensor bytes)"
    return line


def branch_tensor_bytes(row: Mapping[str, Any], file_bytes: int | None, header_bytes: int | None) -> int:
    """A branch row's tensor bytes. summary.json's lossless row counts the coded file (its bytes are
    the file's, header included); every other row counts tensors only."""
    counts_the_file = str(row["branch"]).startswith("lossless") and row["bytes"] == file_bytes
    return row["bytes"] - header_bytes if counts_the_file and header_bytes is not None else row["bytes"]


def branch_table(branches: Sequence[Mapping[str, Any]], params: int, title: str, file_bytes: int | None = None,
                 header_bytes: int | None = None, seconds: Mapping[str, str] | None = None) -> Table:
    """summary.json's branch rows, sizes as tensor bytes (bpw and ratio of them, per original
    parameter); `seconds` (branch -> text) adds a seconds column."""
    table = Table(title=title)
    columns = ["branch", "weights", "tensor bytes", "bpw", "ratio", "ppl", "KL", "top-1"]
    for column in columns + (["seconds"] if seconds is not None else []):
        table.add_column(column, justify="left" if column == "branch" else "right")
    for row in branches:
        tensor_bytes = branch_tensor_bytes(row, file_bytes, header_bytes)
        bpw = tensor_bytes * 8 / params
        quality = [f"{row[k]:.4g}" if row.get(k) is not None else "-" for k in ("ppl", "kl", "top1")]
        cells = [str(row["branch"]), f"{row['weights']:,}", f"{tensor_bytes:,}", f"{bpw:.4f}",
                 f"{16 / bpw:.2f}x" if bpw else "-", *quality]
        table.add_row(*cells, *([seconds.get(row["branch"], "-")] if seconds is not None else []))
    return table


def print_branch_table(console: Console, branches: Sequence[Mapping[str, Any]], params: int, weights: Path,
                       title: str, protocol: str | None = None, seconds: Mapping[str, str] | None = None) -> None:
    """The branch table, then the note tying its last row to the file `weights` (model.safetensors),
    then the quality protocol. `compress` and `inspect` both print it."""
    file_bytes = weights.stat().st_size if weights.is_file() else None
    header_bytes = safetensors_header_bytes(weights) if file_bytes is not None else None
    console.print(branch_table(branches, params, title, file_bytes, header_bytes, seconds))
    if branches and header_bytes is not None:
        last = branch_tensor_bytes(branches[-1], file_bytes, header_bytes)
        console.print(f"tensor bytes: stored tensors only; {file_note(file_bytes, header_bytes, params, last)}")
    if protocol:
        console.print(f"quality: {protocol}")
