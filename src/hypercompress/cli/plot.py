"""hypercompress plot FOLDER --out rd.png: the rate-distortion plot of every run in a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from ..analysis.rate_distortion import collect, plot as draw
from .common import check_output_file, console, one_line_errors


@one_line_errors
def plot(
    folder: Path = typer.Argument(..., help="results folder (benchmarks/results) or a folder of artifacts"),
    out: Path = typer.Option(Path("rate_distortion.png"), "--out", help="PNG to write"),
) -> None:
    """Perplexity vs bits per weight (log-log) for every result row and artifact summary in FOLDER."""
    check_output_file(out, "--out")
    series = collect(folder)
    draw(series, out)
    points = sum(len(p) for p in series.values())
    console.print(f"{out}: {points} points in {len(series)} series ({', '.join(series)})")
