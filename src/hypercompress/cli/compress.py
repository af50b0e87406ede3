"""hypercompress compress MODEL (--recipe FILE | --method NAME) [--set k=v]... --out DIR"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.table import Table

from .. import artifact
from ..api import compress as compress_model
from ..data import calibration_samples, read_text, tokenize
from ..errors import UserError
from ..models import load_model
from ..modules import count_params
from ..recipe import Recipe
from ..registry import get_method
from .common import console, err_console, one_line_errors, progress_bar, write_json


@one_line_errors
def compress(
    model: str = typer.Argument(..., help="smollm2-135m, a .gguf file, a HF model directory or a hub id"),
    out: Path = typer.Option(..., "--out", help="artifact directory to create (must not exist)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe file"),
    method: Optional[str] = typer.Option(None, "--method", help="one method with its defaults"),
    overrides: list[str] = typer.Option([], "--set", help="override: key=value or STAGE.key=value"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text (never the test text)"),
    calib_samples: int = typer.Option(32, "--calib-samples", help="calibration windows"),
    calib_len: int = typer.Option(512, "--calib-len", help="tokens per calibration window"),
    seed: int = typer.Option(0, "--seed", help="seed for sampling and any randomness"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where each block is calibrated"),
    calib_batch: int = typer.Option(8, "--calib-batch", help="calibration windows per forward pass"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run from its checkpoint"),
    report_json: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
) -> None:
    """Compress MODEL with a recipe and write an artifact directory."""
    plan = _recipe(recipe, method).with_overrides(overrides)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; pass a new --out path")
    checkpoint_dir = out.with_name(out.name + ".checkpoint")
    if checkpoint_dir.exists() and not resume:
        raise UserError(f"{checkpoint_dir} holds an unfinished run; pass --resume to continue it "
                        "or remove the directory")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: must be cpu or cuda")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available; use --device cpu")
    calibrated = any(get_method(s.method).method_cls.needs_calibration for s in plan.stages)
    if calibrated and calib is None:
        raise UserError("this recipe calibrates (gptq, ...): pass --calib FILE "
                        "(e.g. ../shared/data/wikitext2_valid_tokenized.txt; never the test text)")
    calib_text = read_text(calib) if calib else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    with err_console.status(f"loading {model}"):
        loaded = load_model(model)
    load_seconds = time.perf_counter() - start
    original_params = count_params(loaded.model)
    samples = None
    if calibrated:
        samples = calibration_samples(tokenize(loaded.tokenizer, calib_text), calib_samples,
                                      calib_len, seed)
    tick = time.perf_counter()
    with progress_bar("compressing") as update:
        report = compress_model(loaded.model, plan, samples,
                                progress=lambda i, m, done, total: update(done, total),
                                device=device, batch_size=calib_batch,
                                checkpoint_dir=checkpoint_dir if calibrated else None, resume=resume)
    compress_seconds = time.perf_counter() - tick
    path = artifact.save(loaded.model, loaded.tokenizer, out, recipe=plan.to_list(),
                         original_params=original_params,
                         extra={"source_model": model, "seed": seed})
    manifest = artifact.read_manifest(path)
    summary = {
        "model": model, "out": str(path), "recipe": plan.to_list(), "stages": report["stages"],
        "original_params": original_params, **manifest["totals"],
        "load_seconds": round(load_seconds, 2), "compress_seconds": round(compress_seconds, 2),
        "peak_memory_bytes": max(st["peak_memory_bytes"] for st in report["stages"]),
        "device": device,
    }
    _print(summary)
    write_json(report_json, summary)


def _recipe(recipe: Optional[Path], method: Optional[str]) -> Recipe:
    if (recipe is None) == (method is None):
        raise UserError("pass exactly one of --recipe FILE or --method NAME")
    return Recipe.from_yaml(recipe) if recipe is not None else Recipe.single(method)


def _print(summary: dict) -> None:
    table = Table(title=f"compressed {summary['model']} -> {summary['out']}")
    for column in ("stage", "method", "modules", "seconds"):
        table.add_column(column)
    for stage in summary["stages"]:
        table.add_row(str(stage["stage"]), stage["method"], str(stage["modules"]), str(stage["seconds"]))
    console.print(table)
    console.print(
        f"original params {summary['original_params']:,} | safetensors {summary['safetensors_bytes']:,} B"
        f" | {summary['bits_per_weight']:.3f} bits per weight (whole model, all tensors)"
        f" | {16 / summary['bits_per_weight']:.2f}x vs 16-bit | compress {summary['compress_seconds']} s"
        f" | peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['device']})"
    )
