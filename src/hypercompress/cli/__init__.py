"""The `hypercompress` command: compress, evaluate, inspect, export, env, plot, analyze, edit (one file per subcommand).

The subcommand modules import only typer, rich and light modules of ours at the top; torch,
transformers and the library come inside each command's body, so `--help` and a bad option answer
at once. Each command that loads models quiets the libraries first (cli/quiet.py, `--verbose`).
"""

from __future__ import annotations

from .clock import STARTED  # noqa: F401  (first: the start-up row of a run's time table counts from here)

import typer  # noqa: E402

from . import analyze, compress, edit, env, evaluate, export, inspect, plot
from .common import OneLineUsageErrors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face causal LMs smaller; measure what it cost.",
                  cls=OneLineUsageErrors)  # bad option values: one line 'error: ...', exit 2

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
