"""Shared CLI plumbing: one-line errors with exit code 2, rich progress bars, dtype parsing."""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

try:  # recent typer carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:
    from click import exceptions as _click_errors

UsageError = _click_errors.UsageError
NoArgsIsHelpError = getattr(_click_errors, "NoArgsIsHelpError", ())  # click >= 8.2: no arguments, help

from ..atomic import replace_file
from ..errors import UserError

if TYPE_CHECKING:
    import torch

# results on stdout; piped to a file or a log, tables are not folded to 80 columns and a line is
# never broken (soft wrap: a long footer stays one line for grep and diff)
# markup off: paths, labels and names read from files are printed as they are ("[/x]" is not a tag)
console = Console(width=None if sys.stdout.isatty() else 160, markup=False, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, markup=False, soft_wrap=not sys.stderr.isatty())  # progress on stderr
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names (torch is imported when one is parsed)


def one_line_errors(command: Callable) -> Callable:
    """Turn UserError into 'error: ...' on stderr and exit code 2 (no traceback); so too an OSError
    the machine raised (a full disk, a path another run took meanwhile): atomic writes have already
    removed their temporary folders when it arrives here."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or type(exc).__name__}{where}; free disk space, check that "
                       "path's permissions, or make sure no other run writes there", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


class OneLineUsageErrors(TyperGroup):
    """The app's group: click's usage errors (an option value outside its `min=`/`max=` range, a
    missing option, an unknown command) print as one line 'error: ...' with exit code 2, like
    UserError, instead of a usage panel."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _usage_error(exc)


def _usage_error(exc: UsageError) -> None:
    if isinstance(exc, NoArgsIsHelpError):
        raise exc  # no arguments at all: the help is printed
    command = exc.ctx.command_path if exc.ctx is not None else "hypercompress"
    message = " ".join(exc.format_message().split()).rstrip(".")
    typer.echo(f"error: {message}; see '{command} --help'", err=True)
    raise typer.Exit(2)


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (torch imported here, not with the CLI: --help stays fast)."""
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: must be one of {', '.join(DTYPES)}; pass one of them")
    import torch

    return getattr(torch, name)


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


def progress_lines(every: float = 5.0):
    """progress(section, done, total): a line on stderr when a section starts, ends, or every few seconds."""
    state = {"section": None, "last": 0.0, "start": time.perf_counter()}

    def update(section: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if section != state["section"] or done == total or now - state["last"] >= every:
            state.update(section=section, last=now)
            err_console.print(f"[{now - state['start']:6.0f} s] {section}: {done}/{total}")

    return update


@contextmanager
def section_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Yields update(section, done, total): one rich bar per section on stderr, a new one when the
    section changes (a library call's `progress` callback)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(section: str, done: int, total: int) -> None:
            if section not in tasks:
                tasks[section] = bar.add_task(section, total=total)
            bar.update(tasks[section], completed=done, total=total)

        yield update


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Write `data` to a --json file (its folder made if needed); an unwritable path is a UserError."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2) + "\n"
        replace_file(path, lambda tmp: tmp.write_text(text))  # a kill never leaves half a report
    except OSError as exc:
        raise UserError(f"cannot write --json {path} ({exc.strerror or type(exc).__name__}); "
                        "pass a writable file path") from None
