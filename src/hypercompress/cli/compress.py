"""hypercompress compress MODEL (--recipe FILE | --method NAME) [--set k=v]... --out DIR"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.table import Table

from .. import artifact, parallel
from ..api import compress as compress_model
from ..arch import check_length, position_limit
from ..artifact_reader import read_manifest_fields
from ..checkpoint import describe_leftover, discard
from ..data import calibration_samples, read_text, tokenize, windows
from ..eval import protocol_text
from ..errors import UserError
from ..layers.latent_kv import kv_cache_bytes_per_token
from ..methods.structured.surgery import flops_per_token
from ..models import load_model
from ..modules import count_params
from ..recipe import PlanTarget, Recipe, load_recipe_file
from ..registry import get_method
from ..summary import SUMMARY_JSON, BranchMeter, branch_rows, dense_weights, documents, module_rows
from ..targets import planned_recipe
from .common import (check_output_file, check_output_folder, console, err_console, one_line_errors,
                     progress_bar, section_progress, write_json)


EVAL_LEN = 512  # tokens per --eval window (capped to the model's position limit)


@one_line_errors
def compress(
    model: str = typer.Argument(..., help="smollm2-135m, a .gguf file, a HF model directory or a hub id"),
    out: Path = typer.Option(..., "--out", help="artifact directory to create (must not exist)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe file"),
    method: Optional[str] = typer.Option(None, "--method", help="one method with its defaults"),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw",
                                               help="plan mixed bit-widths for this whole-model bpw"),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio",
                                                 help="plan for this size ratio vs 16-bit (bpw = 16 / R)"),
    overrides: list[str] = typer.Option([], "--set", help="override: key=value or STAGE.key=value"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text (never the test text)"),
    calib_samples: int = typer.Option(32, "--calib-samples", min=1, help="calibration windows"),
    calib_len: int = typer.Option(512, "--calib-len", min=2, help="tokens per calibration window"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="seed for sampling and any randomness"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where each block is calibrated"),
    calib_batch: int = typer.Option(8, "--calib-batch", min=1, help="calibration windows per forward pass"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run from its checkpoint"),
    report_json: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
    lossless: Optional[int] = typer.Option(None, "--lossless", help="zstd level (1..22, e.g. 10): store "
                                           "every tensor byte-grouped and zstd-coded (exact); 0: off. "
                                           "Size targets use 10 unless given"),
    distill: bool = typer.Option(False, "--distill", help="with a size target: recovery against the original "
                                 "(quantized plans: qat trains the codes' latent weights and scales; below the "
                                 "quantization floor: distill trains the low-rank factors and scales)"),
    distill_steps: int = typer.Option(600, "--distill-steps", min=1,
                                       help="distillation steps (8 x calib-len tokens each)"),
    eval_text: Optional[str] = typer.Option(None, "--eval", help="evaluation text: perplexity / KL after "
                                            "every branch in the summary (e.g. ../shared/data/wikitext2_test.txt)"),
    eval_windows: int = typer.Option(16, "--eval-windows", min=1,
                                      help="windows of --eval measured per branch (512 tokens, or the "
                                      "model's position limit when shorter)"),
) -> None:
    """Compress MODEL with a recipe (or a planned one for a size target); write an artifact."""
    target = _target(target_bpw, target_ratio, recipe, method, overrides)
    plan = None
    if target is None:
        plan = _recipe(recipe, method)
        if isinstance(plan, PlanTarget):
            target = _with_group(plan, overrides)
            plan = None
        else:
            plan = plan.with_overrides(overrides)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; pass a new --out path")
    if lossless is not None and not 0 <= lossless <= 22:
        raise UserError(f"--lossless {lossless}: zstd levels are 1..22 (10 is a good default), 0 turns it off; pass one of them")
    check_output_folder(out)  # refused now, not after the compression
    check_output_file(report_json)
    if distill and target is None:
        raise UserError("--distill goes with --target-ratio/--target-bpw; in a recipe add a distill stage")
    if target is not None and lossless is None:
        lossless = 10
    lossless = lossless or None
    checkpoint_dir = out.with_name(out.name + ".checkpoint")
    if checkpoint_dir.exists() and not resume:
        raise UserError(describe_leftover(checkpoint_dir))
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: must be cpu or cuda; pass one of them")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available; use --device cpu")
    device = parallel.setup(device)  # several processes under torchrun / accelerate launch: this one's GPU
    calibrated = target is not None or any(get_method(s.method).method_cls.needs_calibration
                                           for s in plan.stages)
    if calibrated and calib is None:
        raise UserError("this recipe calibrates (gptq, ...): pass --calib FILE "
                        "(e.g. ../shared/data/wikitext2_valid_tokenized.txt; never the test text)")
    calib_text = read_text(calib) if calib else None
    evaluation = read_text(eval_text) if eval_text else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    with err_console.status(f"loading {model}"):
        loaded = load_model(model)
    load_seconds = time.perf_counter() - start
    original_params = count_params(loaded.model)
    samples = None
    if calibrated:
        check_length(loaded.model.config, calib_len, "--calib-len")
        samples = calibration_samples(tokenize(loaded.tokenizer, calib_text), calib_samples,
                                      calib_len, seed)
    meter, baseline, protocol = None, None, None
    if evaluation is not None and parallel.is_main():  # a launched run's other processes write nothing
        ids = tokenize(loaded.tokenizer, evaluation)
        eval_len = min(EVAL_LEN, position_limit(loaded.model.config) or EVAL_LEN)  # fits the model
        chunks = windows(ids, eval_len, eval_windows)
        protocol = protocol_text(eval_text, eval_len, chunks.shape[0], ids.numel() // eval_len,
                                 torch.float32, "the uncompressed model", device)
        meter = BranchMeter(loaded.model, chunks, protocol, device=device)
        with err_console.status("measuring the original"):
            baseline = meter(loaded.model)
    weights_before = dense_weights(loaded.model)
    kv_before, flops_before = kv_cache_bytes_per_token(loaded.model), flops_per_token(loaded.model)
    tick = time.perf_counter()
    allocation = None
    if target is not None:
        with section_progress() as update:
            plan, allocation = planned_recipe(loaded.model, target, samples, distill_steps if distill else 0,
                                              lossless, device, say=console.print, progress=update)
    with progress_bar("compressing") as update:
        report = compress_model(loaded.model, plan, samples,
                                progress=lambda i, m, done, total: update(done, total, m),
                                device=device, batch_size=calib_batch,
                                checkpoint_dir=checkpoint_dir if calibrated else None, resume=resume,
                                keep_checkpoint=True, after_stage=meter)
    compress_seconds = time.perf_counter() - tick
    if target is not None:
        try:
            _check_target(artifact.stored_bytes(loaded.model, lossless) * 8 / original_params, target)
        except UserError:
            if checkpoint_dir.exists():  # the run finished: its checkpoint would only block the next one
                discard(checkpoint_dir)
            raise
    del meter
    if not parallel.is_main():  # the other processes of a launched run hold the same model
        return
    kv_cache = {"before": kv_before, "after": kv_cache_bytes_per_token(loaded.model), "dtype": "float32"}
    flops = {"before": flops_before, "after": flops_per_token(loaded.model), "context": 512}
    summary_of = lambda size: documents({  # noqa: E731  (the summary, once the weights file's size is known)
        "model": model, "recipe": plan.to_list(), "protocol": protocol,
        "branches": branch_rows(report["stages"], original_params, baseline, size, lossless),
        "modules": module_rows(weights_before, loaded.model), "kv_cache_bytes_per_token": kv_cache,
        "flops_per_token": flops})
    path = artifact.save(loaded.model, loaded.tokenizer, out, recipe=plan.to_list(),
                         original_params=original_params,
                         extra={"source_model": model, "seed": seed}, lossless=lossless, documents=summary_of)
    discard(checkpoint_dir)  # only once the artifact is complete
    manifest = read_manifest_fields(path)  # just written: the totals, without verifying it twice
    summary = {
        "model": model, "out": str(path), "recipe": plan.to_list(), "stages": report["stages"],
        "original_params": original_params, **manifest["totals"],
        "load_seconds": round(load_seconds, 2), "compress_seconds": round(compress_seconds, 2),
        "peak_memory_bytes": max(st["peak_memory_bytes"] for st in report["stages"]),
        "device": device, "target_bpw": target and target.bits_per_weight, "allocation": allocation,
        "branches": json.loads((path / SUMMARY_JSON).read_text())["branches"], "protocol": protocol,
        "kv_cache_bytes_per_token": kv_cache, "flops_per_token": flops,
    }
    _print(summary)
    write_json(report_json, summary)


def _check_target(bpw: float, target: PlanTarget) -> None:
    """A size target is never exceeded by more than 2% (the file's bytes, lossless stage included):
    the planner fits its RTN size trials to [target - 2%, target], and the written codes may code a
    little differently, so the file is checked again. A file further under the target is kept with
    a note: a --distill plan leaves qat's trained codes room to code larger (planner.QAT_CODE_GROWTH),
    and codes that trained less than that room leave it unused."""
    ratio = bpw / target.bits_per_weight
    if ratio > 1.02:
        raise UserError(f"the compressed file stores {bpw:.4f} bpw ({16 / bpw:.2f}x), over the target "
                        f"{target.bits_per_weight:.4f} bpw ({16 / target.bits_per_weight:.2f}x) by more than 2% "
                        f"(the written file codes unlike the planner's size trial); ask for a target near "
                        f"{bpw:.3f} bpw, e.g. --target-bpw {bpw:.3f}")
    if ratio < 0.98:
        console.print(f"note: the file stores {bpw:.4f} bpw, {1 - ratio:.1%} under the target "
                      f"{target.bits_per_weight:.4f} (the codes coded smaller than the planner allowed for)")


def _target(bpw: Optional[float], ratio: Optional[float], recipe, method,
            overrides: list[str]) -> Optional[PlanTarget]:
    if bpw is None and ratio is None:
        return None
    if bpw is not None and ratio is not None:
        raise UserError("--target-bpw and --target-ratio were both given; pass only one of them")
    if recipe is not None or method is not None:
        raise UserError("--target-bpw/--target-ratio plan their own recipe; drop --recipe/--method")
    return _with_group(PlanTarget.from_values(bpw, ratio, where="--target-bpw/--target-ratio"), overrides)


def _with_group(target: PlanTarget, overrides: list[str]) -> PlanTarget:
    """A target accepts one override: --set group_size=G (the size of the grouped options)."""
    group = target.group_size
    for item in overrides:
        key, _, value = item.partition("=")
        if key != "group_size":
            raise UserError(f"--set {item}: with a size target only group_size can be set; drop the other --set values or use --recipe")
        group = value
    return PlanTarget.from_values(target.bits_per_weight, None, group, where="--set group_size")


def _recipe(recipe: Optional[Path], method: Optional[str]) -> "Recipe | PlanTarget":
    if (recipe is None) == (method is None):
        raise UserError("give exactly one of --recipe FILE or --method NAME (or a size target instead: --target-bpw or --target-ratio); pass one of them")
    return load_recipe_file(recipe) if recipe is not None else Recipe.single(method)


def _print(summary: dict) -> None:
    table = Table(title=f"compressed {summary['model']} -> {summary['out']}")
    for column in ("branch", "weights", "bytes", "bpw", "ratio", "ppl", "KL", "seconds"):
        table.add_column(column, justify="left" if column == "branch" else "right")
    seconds = {f"{st['stage']}: {st['method']}": str(st["seconds"]) for st in summary["stages"]}
    for r in summary["branches"]:
        quality = [f"{r[k]:.4g}" if r.get(k) is not None else "-" for k in ("ppl", "kl")]
        table.add_row(r["branch"], f"{r['weights']:,}", f"{r['bytes']:,}", f"{r['bits_per_weight']:.4f}",
                      f"{r['ratio_vs_16bit']:.2f}x", *quality, seconds.get(r["branch"], "-"))
    console.print(table)
    if summary["protocol"]:
        console.print(f"quality: {summary['protocol']}")
    kv = summary["kv_cache_bytes_per_token"]
    flops = summary["flops_per_token"]
    console.print(f"KV cache per token ({kv['dtype']} cache, measured): {kv['before']:,.0f} -> {kv['after']:,.0f} bytes"
                  f" | FLOPs per token (context {flops['context']}): {flops['before']:,} -> {flops['after']:,}")
    console.print(
        f"original params {summary['original_params']:,} | safetensors {summary['safetensors_bytes']:,} B"
        f" | {summary['bits_per_weight']:.4f} bits per weight (whole model, all tensors)"
        f" | {16 / summary['bits_per_weight']:.2f}x vs 16-bit | compress {summary['compress_seconds']} s"
        f" | peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['device']})"
    )
