"""hypercompress analyze MODEL_OR_ARTIFACT --calib TEXT --out DIR: where the model's bits go."""

from __future__ import annotations

from pathlib import Path

import typer

from ..storage.atomic import check_output_folder, refuse_existing
from ..sources.hub import check_hub_model
from ..sources.text_source import check_text_source
from .common import console, one_line_errors, section_progress
from .quiet import VERBOSE, quiet_libraries


@one_line_errors
def analyze(
    model: str = typer.Argument(..., help="smollm2-135m, a .gguf file, a HF model directory, a hub id or an artifact"),
    out: Path = typer.Option(..., "--out", help="report folder to create (report.md, PNGs, analysis.json)"),
    calib: str = typer.Option(..., "--calib", help="calibration text (never the test text)"),
    calib_samples: int = typer.Option(8, "--calib-samples", min=1, help="calibration windows"),
    calib_len: int = typer.Option(256, "--calib-len", min=2, help="tokens per calibration window"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="seed of the windows' offsets"),
    rd_layers: list[str] = typer.Option([], "--rd-layer", help="a linear to measure against the rate-distortion "
                                        "bound (repeatable; default: the first, middle and last blocks' linears)"),
    sensitivity: bool = typer.Option(True, "--sensitivity/--no-sensitivity",
                                     help="the planner's per-module KL probe (minutes on a CPU)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    verbose: bool = VERBOSE,
) -> None:
    """Weight statistics, sensitivity, rate-distortion against the Gaussian bound, information flow."""
    quiet_libraries(verbose)
    refuse_existing(out)
    check_output_folder(out)  # refused now, before torch loads
    check_text_source(calib, "--calib")
    check_hub_model(model)  # offline or unreachable: one line now, before the library loads
    from ..analysis.public import analyze as run_analysis

    with section_progress() as update:
        result = run_analysis(model, calib, out=out, calib_samples=calib_samples, calib_len=calib_len, seed=seed,
                              rd_layers=rd_layers or None, sensitivity=sensitivity, device=device, progress=update)
    flow = [r for r in result["flow"] if r["influence"] == r["influence"]]
    low = min(flow, key=lambda r: r["influence"]) if flow else None
    excess = [p["excess_bits"] for d in result["rate_distortion"].values() for p in d["points"] if p["method"] == "GPTQ"]
    console.print(f"{out}/report.md: {len(result['weights'])} layers | protocol: {result['protocol']}")
    if low:
        console.print(f"least influential block: {low['block']} (1 - cos = {low['influence']:.4f})")
    if excess:
        console.print(f"GPTQ spends {min(excess):+.2f} to {max(excess):+.2f} bits per weight over the Gaussian bound "
                      f"on {len(result['rate_distortion'])} layers")
