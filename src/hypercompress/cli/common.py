"""Shared CLI plumbing: one-line errors with exit code 2, progress (cli/progress.py), dtype parsing."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # recent typer carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:
    from click import exceptions as _click_errors

UsageError = _click_errors.UsageError
NoArgsIsHelpError = getattr(_click_errors, "NoArgsIsHelpError", ())  # click >= 8.2: no arguments, help

from ..storage.atomic import replace_file
from ..errors import UserError
from .progress import show_progress

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


section_progress = show_progress  # (the commands' name for it)


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
