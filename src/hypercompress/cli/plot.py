"""hypercompress plot FOLDER --out rd.png: the rate-distortion plot of every run in a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from ..storage.atomic import check_output_file
from .common import console, one_line_errors


@one_line_errors
def plot(
    folder: Path = typer.Argument(..., help="results folder (benchmarks/results) or a folder of artifacts"),
    out: Path = typer.Option(Path("rate_distortion.png"), "--out", help="PNG to write"),
) -> None:
    """Perplexity vs bits per weight (log-log) for every result row and artifact summary in FOLDER
    (a JSON file that cannot be read or has fields of the wrong type is skipped with a warning)."""
    from ..analysis.rate_distortion import collect, plot as draw

    check_output_file(out, "--out")
    series = collect(folder, warn=lambda message: typer.echo(f"warning: {message}", err=True))
    draw(series, out)
    points = sum(len(p) for p in series.values())
    console.print(f"{out}: {points} points in {len(series)} series ({', '.join(series)})")
