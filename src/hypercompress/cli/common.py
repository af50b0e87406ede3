"""Shared CLI plumbing: one-line errors with exit code 2, rich progress bars, dtype parsing."""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..atomic import replace_file
from ..errors import UserError

# results on stdout; piped to a file or a log, tables are not folded to 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)  # progress on stderr
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def one_line_errors(command: Callable) -> Callable:
    """Turn UserError into 'error: ...' on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None]]:
    """Yields update(done, total, note=""); draws a rich bar on stderr (hidden when not a terminal);
    the note (e.g. "hypernet | loss 1.2 | kl 0.9 | 5,000 tok/s") is shown after the bar."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=err_console,
                  transient=True) as bar:
        task = bar.add_task(description, total=None, note="")

        def update(done: int, total: int, note: str = "") -> None:
            bar.update(task, completed=done, total=total, note=note)

        yield update


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2) + "\n"
        replace_file(path, lambda tmp: tmp.write_text(text))  # a kill never leaves half a report
