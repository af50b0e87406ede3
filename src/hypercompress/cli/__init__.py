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


# GNU OpenMP (torch's CPU threads) spins this many rounds waiting for work before it sleeps (its
# default: 300,000). On cores another process also uses, the default spinning starves the threads
# it waits for. Measured on a 2-core Xeon, 2 torch threads, one core kept busy by another process:
# SmolLM2 decode 1.6 tok/s with the default, 9.5 with 30,000, 21 with 3,000; evaluate 267 / 363 /
# 422 (10,000) tokens/s; on idle cores 30,000 is as fast as the default (decode 53.5 vs 52.0 tok/s,
# evaluate 879 vs 887 tokens/s), 3,000-10,000 lose 3-25%.
OMP_SPIN_COUNT = "30000"


def main() -> None:
    import os
    import signal
    import sys

    # before torch loads (it reads GOMP_SPINCOUNT once); a value the user set is kept
    os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)
    # a terminated run unwinds like Ctrl-C, so atomic writes remove their temporary folders
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app()
