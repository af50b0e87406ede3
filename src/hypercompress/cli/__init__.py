"""The `hypercompress` command: compress, evaluate, inspect, env (one file per subcommand)."""

from __future__ import annotations

import typer

from . import compress, env, evaluate, inspect

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face causal LMs smaller; measure what it cost.")
app.command("compress")(compress.compress)
app.command("evaluate")(evaluate.evaluate)
app.command("inspect")(inspect.inspect)
app.command("env")(env.env)


def main() -> None:
    app()
