"""hypercompress compress MODEL (--recipe FILE | --method NAME | --target-bpw B) [--set k=v]... --out DIR

Parses the options, calls `hypercompress.workflow.compress` (the library does the whole job) and
prints its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..storage.atomic import check_output_file, check_output_folder, refuse_existing
from ..sources.hub import check_hub_model
from ..sources.text_source import check_text_source
from ..registry import check_method_name
from .clock import STARTED
from .common import console, one_line_errors, section_progress, write_json
from .progress import print_time_table, process_seconds
from .quiet import VERBOSE, quiet_libraries
from .tables import print_branch_table


@one_line_errors
def compress(
    model: str = typer.Argument(..., help="smollm2-135m, a .gguf file, a HF model directory or a hub id"),
    out: Path = typer.Option(..., "--out", help="artifact directory to create (must not exist, or be an empty folder)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe file"),
    method: Optional[str] = typer.Option(None, "--method", help="one method with its defaults"),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw",
                                               help="plan mixed bit-widths for this whole-model bpw"),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio",
                                                 help="plan for this size ratio vs 16-bit (bpw = 16 / R)"),
    overrides: list[str] = typer.Option([], "--set", help="override: key=value or STAGE.key=value (with a size target: group_size=G, and with --distill the recovery's qat.KEY=VALUE)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text (never the test text)"),
    calib_samples: int = typer.Option(32, "--calib-samples", min=1, help="calibration windows"),
    calib_len: int = typer.Option(512, "--calib-len", min=2, help="tokens per calibration window"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="seed for sampling and any randomness"),
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
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps",
                                                help="recovery steps of --distill (default: on a CPU 600 steps "
                                                "of 8 windows; on CUDA a token budget sized to the model)"),
    train_tokens: Optional[int] = typer.Option(None, "--train-tokens", help="token budget of every trained "
                                               "stage (--distill's recovery, or qat/distill in a recipe)"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="wall-time budget of each trained "
                                                "stage's training loop (qat: end to end), in minutes (--distill on "
                                                "CUDA: 10)"),
    corpus_cache: Optional[str] = typer.Option(None, "--corpus-cache", help="folder (or one .safetensors file) "
                                               "caching the corpus the original writes for training (default "
                                               "$HYPERCOMPRESS_CACHE/corpus or ~/.cache/hypercompress/corpus)"),
    eval_text: Optional[str] = typer.Option(None, "--eval", help="evaluation text: perplexity / KL after "
                                            "every branch in the summary (e.g. ../shared/data/wikitext2_test.txt)"),
    stream_blocks: bool = typer.Option(False, "--stream-blocks", help="read a model directory's blocks from "
                                       "its safetensors files one at a time (the original is never whole in "
                                       "RAM; a size target's planner still reads it all)"),
    log_dir: Optional[str] = typer.Option(None, "--log-dir", help="TensorBoard logs of every trained stage "
                                          "and of the summary (needs tensorboard)"),
    wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="the same to a Weights & Biases "
                                                "project (offline unless WANDB_MODE says otherwise; needs wandb)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="distil from this model instead of the "
                                          "original (same tokenizer, e.g. a larger model of the family): "
                                          "--distill's recovery or a recipe's qat / distill stages"),
    eval_windows: int = typer.Option(16, "--eval-windows", min=1,
                                      help="windows of --eval measured per branch (512 tokens, or the "
                                      "model's position limit when shorter)"),
    verbose: bool = VERBOSE,
) -> None:
    """Compress MODEL with a recipe (or a planned one for a size target); write an artifact."""
    quiet_libraries(verbose)
    if method is not None:  # a typo answers now, before torch and transformers are imported
        check_method_name(method)
    check_output_folder(refuse_existing(out))
    check_output_file(report_json)  # refused now, not after the compression
    for option, text in (("--calib", calib), ("--eval", eval_text)):
        if text is not None:
            check_text_source(text, option)  # a missing file answers now, before torch loads
    check_hub_model(model)  # offline or unreachable: one line now, before the library loads
    if teacher is not None:
        check_hub_model(teacher)
    from ..workflow import compress as run_compress

    started = process_seconds(STARTED)  # the start-up: interpreter, imports, option checks
    with section_progress() as update:
        result = run_compress(model, recipe, calib, method=method, overrides=overrides, target_bpw=target_bpw,
                              target_ratio=target_ratio, out=out, distill=distill, distill_steps=distill_steps,
                              train_tokens=train_tokens, max_minutes=max_minutes, corpus_cache=corpus_cache,
                              lossless=lossless, calib_samples=calib_samples, calib_len=calib_len,
                              calib_batch=calib_batch, seed=seed, device=device, resume=resume,
                              eval_text=eval_text, eval_windows=eval_windows, stream_blocks=stream_blocks,
                              log_dir=log_dir, wandb_project=wandb_project, teacher=teacher,
                              say=console.print, progress=update)
    if result.out is None:  # another process of a launched run: the main one writes and prints
        return
    _print(result.summary)
    print_time_table(console, result.summary["timeline"], started)
    write_json(report_json, result.summary)


def _print(summary: dict) -> None:
    seconds = {f"{st['stage']}: {st['method']}": str(st["seconds"]) for st in summary["stages"]}
    print_branch_table(console, summary["branches"], summary["original_params"],
                       Path(summary["out"]) / "model.safetensors", f"compressed {summary['model']} -> {summary['out']}",
                       summary["protocol"], seconds=seconds)
    for stage in summary["stages"]:
        run = (stage.get("training") or {}).get("end_to_end")
        if run:
            resumed = run.get("resumed_at_step")
            corpus = stage["training"].get("corpus_windows")
            console.print(f"{stage['method']} trained {run['steps']} steps: {run['tokens']:,} tokens seen"
                          + (f" (resumed at step {resumed}; this run's steps" if resumed else "")
                          + f" at {run['tokens_per_second']:,.0f} tok/s in {run['seconds']:.0f} s"
                          + (")" if resumed else "")
                          + (" (stopped by --max-minutes)" if run.get("stopped_by_time") else "")
                          + (f" on {run['processes']} processes, " + ("sharded (FSDP2)" if run.get("sharding") == "fsdp"
                                                                       else "replicated") if run.get("processes", 1) > 1 else "")
                          + (f"; corpus {corpus:,} windows written by "
                             f"{'the teacher' if summary.get('teacher') else 'the original'}, drawn at share "
                             f"{stage['training'].get('corpus_share', 0):g}" if corpus is not None else ""))
    kv = summary["kv_cache_bytes_per_token"]
    flops = summary["flops_per_token"]
    console.print(f"KV cache per token ({kv['dtype']} cache, measured): {kv['before']:,.0f} -> {kv['after']:,.0f} bytes"
                  f" | FLOPs per token (context {flops['context']}): {flops['before']:,} -> {flops['after']:,}")
    console.print(
        f"original params {summary['original_params']:,} | model.safetensors {summary['safetensors_bytes']:,} B"
        f" (the file, header included) | {summary['bits_per_weight']:.4f} bits per weight"
        f" | {16 / summary['bits_per_weight']:.2f}x vs 16-bit | compress {summary['compress_seconds']} s"
        f" | peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['device']})"
    )
