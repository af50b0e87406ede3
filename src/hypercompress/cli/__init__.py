"""The `hypercompress` command: compress, evaluate, inspect, export, env, plot, analyze, edit (one file per subcommand)."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the start-up row of a run's time table counts from here

import typer  # noqa: E402

from . import analyze, compress, edit, env, evaluate, export, inspect, plot
from .common import OneLineUsageErrors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face causal LMs smaller; measure what it cost.",
                  cls=OneLineUsageErrors)  # bad option values: one line 'error: ...', exit 2


@app.callback()
def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors replace transformers' bars and warnings."""
    import os

    from transformers.utils import logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a plain tqdm bar
    logging.set_verbosity_error()
    logging.disable_progress_bar()


app.command("compress")(compress.compress)
app.command("evaluate")(evaluate.evaluate)
app.command("inspect")(inspect.inspect)
app.command("export")(export.export)
app.command("env")(env.env)
app.command("plot")(plot.plot)
app.command("analyze")(analyze.analyze)
app.command("edit")(edit.edit)


def main() -> None:
    import signal
    import sys

    # a terminated run unwinds like Ctrl-C, so atomic writes remove their temporary folders
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app()
