"""The whole job in one call: load, calibrate, plan a size target, compress, measure, save, summarise.

    result = hypercompress.compress("smollm2-135m", target_bpw=4.0,
                                    calib="../shared/data/wikitext2_valid_tokenized.txt", out="smol-4bpw")
    result.summary["bits_per_weight"], result.summary["branches"]

`compress` is what `hypercompress compress` runs (the CLI only parses its options, calls this and
prints the summary); `apply.apply_recipe` (exported as `hypercompress.apply_recipe`) is the step it calls
to apply a recipe's stages in place.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import parallel
from .storage import artifact
from .storage.atomic import check_output_folder, refuse_existing
from .apply import check_stages, apply_recipe
from .arch import check_length, position_limit
from .layerwise import peak_memory_bytes
from .storage.reader import SUMMARY_JSON, read_manifest_fields
from .storage.checkpoint import RUN, describe_leftover, discard
from .sources.data import calibration_windows, read_text, tokenize, windows
from .errors import UserError
from .eval import protocol_text
from .kernels import prepare
from .layers.latent_kv import kv_cache_bytes_per_token
from .methods.structured.surgery import flops_per_token
from .sources.models import model_and_tokenizer, source_kind
from .modules import count_params, effective_weights
from .progress import Progress, Timeline, default_progress, library_bars_off
from .planning.target import PlanTarget, check_stored_size, load_recipe_file, planned_recipe, target_with_overrides
from .recipe import Recipe
from .methods import get_method
from .sources.streaming import is_streamed, load_streamed, materialize_all
from .summary import BranchMeter, branch_rows, dense_weights, documents, module_rows
from .training.engine import recovery_defaults
from .training.teacher import check_shared_tokenizer, check_teacher_model, check_teacher_stages

EVAL_LEN = 512  # tokens per evaluation window (capped to the model's position limit)
DISTILL_STEPS = 600  # recovery steps of --distill on a CPU (on CUDA a token budget: recovery_defaults)
Say = Callable[[str], None]                    # a line of what was decided


@dataclass
class CompressResult:
    """What `compress` returns: the compressed model (in memory, identical to the artifact's), its
    tokenizer, the artifact's path (None when nothing was saved) and the summary (sizes in bytes and
    bits per weight of the whole model as stored, per-branch perplexity / KL when measured, seconds,
    peak memory in bytes, the recipe run and, for a size target, how it was planned)."""

    _model: nn.Module = field(repr=False)
    tokenizer: Any
    out: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    _prepared: bool = field(default=False, repr=False)

    @property
    def model(self) -> nn.Module:
        """The compressed model, float32 on the CPU. On first access every compressed module takes
        the fastest exact path there (kernels.prepare_model, as `load` does: dense layers dequantized
        once on a float32 CPU; `model.hypercompress_backends` says which). Moved to another device or
        dtype, it runs its reference forwards until `hypercompress.prepare(model, dtype)` is called."""
        if not self._prepared:
            prepare(self._model)
            self._prepared = True
        return self._model



def compress(model: str | nn.Module, recipe: Recipe | str | Path | list | None = None,
             calib: str | Path | torch.Tensor | None = None, *, tokenizer: Any = None,
             method: str | None = None, overrides: Sequence[str] = (),
             target_bpw: float | None = None, target_ratio: float | None = None,
             out: str | Path | None = None, distill: bool = False, distill_steps: int | None = None,
             train_tokens: int | None = None, max_minutes: float | None = None, corpus_cache: str | None = None,
             lossless: int | None = None, calib_samples: int = 32, calib_len: int = 512,
             calib_batch: int = 8, seed: int = 0, device: str = "cpu", resume: bool = False,
             eval_text: str | Path | None = None, eval_windows: int = 16, stream_blocks: bool = False,
             log_dir: str | None = None, wandb_project: str | None = None,
             teacher: str | nn.Module | None = None, teacher_tokenizer: Any = None,
             say: Say | None = None, progress: Progress | bool | None = True) -> CompressResult:
    """Compress `model` with a recipe, one method, or a planned recipe for a size target.

    model: a source (built-in name such as "smollm2-135m", a .gguf file, a HF model directory, a hub
        id) loaded in float32 on the CPU, or a loaded nn.Module (compressed in place; pass its
        `tokenizer` to tokenize text or save).
    recipe: a Recipe, a YAML recipe file, or a list of stage dicts; or `method` (one method with its
        defaults); or `target_bpw` (whole-model bits per weight as stored, the file's every byte
        counted) / `target_ratio` (16 / bpw): exactly one of the three kinds. `overrides`: "key=value"
        or "STAGE.key=value" strings applied to the recipe (with a target only "group_size=G" and,
        with `distill`, the recovery stage's training keys: "qat.KEY=VALUE" / "distill.KEY=VALUE").
    calib: calibration text file (never the evaluation text) or (N, L) int64 token windows; methods
        with `needs_calibration` and size targets need it. `calib_samples` windows of `calib_len`
        tokens are drawn from a text with `seed`.
    out: artifact folder to write (must not exist or be empty); None keeps the result in memory.
        A calibrated run checkpoints after every block into OUT.checkpoint (`resume` continues it).
    distill: with a size target, recover quality against the original (qat on quantized plans,
        factor distillation below the quantization floor): `distill_steps` steps (default 600), or
        on CUDA by default a token budget sized to the model (training/engine.recovery_defaults:
        54 M tokens for SmolLM2-135M, batch 32, a 3 M-token corpus drawn at share 0.9) capped at 10 minutes.
    train_tokens / max_minutes: the token and wall-time budgets of every trained stage (qat,
        distill): the planned recovery's or a recipe's (a stage's own value wins for a recipe);
        corpus_cache: where the corpus the teacher writes is cached (a folder, or one .safetensors
        file; default $HYPERCOMPRESS_CACHE/corpus or ~/.cache/hypercompress/corpus).
    lossless: zstd level 1..22 for the stored tensors, 0 off (size targets default to 10).
    eval_text: measure perplexity / KL after every branch on `eval_windows` windows of 512 tokens.
    stream_blocks: read a local HF directory's blocks from its safetensors files one at a time
        (sources/streaming.py): the original is never whole in RAM during layer-wise passes (a size
        target's planner still reads all of it first); not with eval_text.
    log_dir / wandb_project: TensorBoard folder / Weights & Biases project (offline unless WANDB_MODE
        says otherwise) for every trained stage that does not name its own (losses, KL, tokens/s,
        learning rate per step) and for the summary at the end (tracking.py).
    teacher: another model sharing the tokenizer (a source like `model`, or a loaded nn.Module with its
        `teacher_tokenizer`) that the trained stages distil from instead of the original: the
        recovery --distill adds, or a recipe's qat / distill stages (training/teacher.py: KL alone,
        its own written corpus; a larger model of the family: Llama-3 8B -> 1B, Phi-2 -> Phi-1.5).
        Refused before any work when its tokenizer differs or no stage trains.
    device: "cpu" or "cuda[:i]": where each block is calibrated. `say(line)` receives decisions.
    progress: True (default): a bar per long step on stderr, or a notebook widget (progress.Bars);
        False: nothing; or a function `progress(section, done, total, note)` called at every step as it
        runs (progress.py).

    The summary's "timeline" lists the wall seconds of every step (loading, calibration windows,
    planning's sensitivity / size / GPTQ trials, each stage, measuring, writing); they add up to its
    "wall_seconds", the time spent in this call.

    Raises UserError (one line naming the problem and its fix) for a bad combination, an unknown
    model or method, a missing calibration text, an unwritable or non-empty `out`, a target no plan
    meets, or a file over the target by more than 2%.
    """
    with library_bars_off(progress):
        timeline = Timeline("checking the options")
        say = say or (lambda _line: None)
        progress = timeline.track(default_progress(progress))
        target, plan, recovery_overrides = _target_or_recipe(recipe, method, overrides, target_bpw, target_ratio)
        out_path = refuse_existing(out) if out is not None else None
        if lossless is not None and not 0 <= lossless <= 22:
            raise UserError(f"--lossless {lossless}: zstd levels are 1..22 (10 is a good default), 0 turns it off; pass one of them")
        if out_path is not None:
            check_output_folder(out_path)  # refused now, not after the compression
        if distill and target is None:
            raise UserError("--distill goes with --target-ratio/--target-bpw; in a recipe add a distill stage")
        if recovery_overrides and not distill:
            raise UserError(f"--set {recovery_overrides[0]}: sets the recovery stage, which only --distill adds; "
                            "add --distill or drop it")
        _check_budgets(distill_steps, train_tokens, max_minutes)
        if teacher is not None:
            if target is not None and not distill:
                raise UserError("--teacher is what --distill's recovery distils from; add --distill or drop --teacher")
            if isinstance(teacher, str):
                try:
                    source_kind(teacher)  # a missing path is refused now, not after the student has loaded
                except UserError as exc:
                    raise UserError(f"--teacher: {exc}") from None
            if plan is not None:
                check_teacher_stages(get_method(s.method).method_cls for s in plan.stages)
        _check_trained(plan, target is not None and distill, train_tokens=train_tokens, max_minutes=max_minutes,
                       corpus_cache=corpus_cache, distill_steps=distill_steps)
        if corpus_cache is not None and not str(corpus_cache).endswith(".safetensors") and Path(corpus_cache).is_file():
            raise UserError(f"--corpus-cache {corpus_cache} is a file; pass a folder or a .safetensors corpus file")
        if target is not None and lossless is None:
            lossless = 10
        lossless = lossless or None
        checkpoint_dir = out_path.with_name(out_path.name + ".checkpoint") if out_path is not None else None
        if checkpoint_dir is not None and checkpoint_dir.exists() and not resume:
            raise UserError(describe_leftover(checkpoint_dir))
        device = _checked_device(device)
        if log_dir is not None or wandb_project is not None:
            from types import SimpleNamespace

            from .tracking import check_tracking

            check_tracking(SimpleNamespace(log_dir=log_dir, wandb_project=wandb_project, wandb_dir=None))
        if out_path is not None and isinstance(model, nn.Module) and tokenizer is None:
            raise UserError("an artifact stores the tokenizer too: pass tokenizer= with a loaded model, or out=None")
        if stream_blocks and not isinstance(model, str):
            raise UserError("stream_blocks reads a model directory: pass its path, not a loaded model")
        if stream_blocks and eval_text is not None:
            raise UserError("--eval after every branch needs the whole original in RAM, which --stream-blocks "
                            "avoids; drop --eval and run 'hypercompress evaluate OUT --teacher MODEL' afterwards")
        calibrated = target is not None or any(get_method(s.method).method_cls.needs_calibration for s in plan.stages)
        if calibrated and calib is None:
            needing = "a size target plans on it" if target is not None else "stages that learn from it: " + ", ".join(
                dict.fromkeys(s.method for s in plan.stages if get_method(s.method).method_cls.needs_calibration))
            raise UserError(f"this run needs calibration text ({needing}): pass --calib FILE "
                            "(e.g. ../shared/data/wikitext2_valid_tokenized.txt; never the test text)")
        calib_text = read_text(calib) if calib is not None and not isinstance(calib, torch.Tensor) else None
        evaluation = read_text(eval_text) if eval_text is not None else None
        torch.manual_seed(seed)
        start = time.perf_counter()
        source = model if isinstance(model, str) else type(model).__name__
        progress(f"loading {source}", 0, 1)
        net, tokenizer = _loaded(model, tokenizer, stream_blocks)
        progress(f"loading {source}", 1, 1)
        distill_teacher = _loaded_teacher(teacher, teacher_tokenizer, net, tokenizer, calib_len, progress)
        load_seconds = time.perf_counter() - start
        if plan is not None:
            check_stages(net, plan)  # a stage that cannot handle this family: refused before calibration
        if corpus_cache is not None and str(corpus_cache).endswith(".safetensors"):
            from .training.corpus import check_corpus_file

            check_corpus_file(corpus_cache, distill_teacher or net)  # another model's corpus: refused before any work
        original_params = count_params(net)
        history = getattr(net, "hypercompress_source", None)  # compressed before: an artifact, or an earlier call
        earlier = None
        if history is not None:
            if target is not None:
                raise UserError("a size target plans from the original model's weights, and this model was compressed "
                                f"before ({' -> '.join(s['method'] for s in history['recipe'])}); pass the original model")
            original_params = history["original_params"]  # sizes stay counted against the original
            earlier = {"recipe": [s["method"] for s in history["recipe"]], "weights": effective_weights(net),
                       "storage_bits": artifact.storage_bits(net)}  # its branch row: the model as loaded
        samples = None
        if calibrated:
            progress("drawing calibration windows", 0, 1)
            samples = calibration_windows(calib_text if calib_text is not None else calib, tokenizer, net.config,
                                          calib_samples, calib_len, seed)
            progress("drawing calibration windows", 1, 1)
        meter, baseline, protocol = None, None, None
        if evaluation is not None and parallel.is_main():  # a launched run's other processes write nothing
            meter, protocol = _meter(net, tokenizer, evaluation, str(eval_text), eval_windows, device, progress)
            baseline = meter(net)
        progress("counting weights, KV cache and FLOPs", 0, 1)
        weights_before = dense_weights(net)
        kv_before = kv_cache_bytes_per_token(net) if not is_streamed(net) else _kv_bytes_from_config(net.config)
        flops_before = flops_per_token(net)
        progress("counting weights, KV cache and FLOPs", 1, 1)
        tick = time.perf_counter()
        allocation = None
        if target is not None:
            if is_streamed(net):
                say("note: the size target's planner runs the whole original: it is read into RAM now")
                materialize_all(net)
            plan, allocation = planned_recipe(net, target, samples, (distill_steps or DISTILL_STEPS) if distill else 0,
                                              lossless, device, say=say, progress=progress)
            if distill and distill_steps is None:  # the recovery's defaults for this model and device
                plan = _with_keys(plan, recovery_defaults(original_params, device), override=True, last_only=True)
            plan = _recovery_overrides(plan, recovery_overrides, say)
        plan = _with_keys(plan, {"log_dir": log_dir, "wandb_project": wandb_project})
        plan = _with_keys(plan, {"train_tokens": train_tokens, "max_minutes": max_minutes, "corpus_cache": corpus_cache},
                          override=True)
        train_calib = _training_windows(plan, net, tokenizer, calib_text, calib_len) if calibrated else None
        try:
            report = apply_recipe(net, plan, samples, progress=lambda stage, label, done, total, note="":
                                  progress(f"stage {stage}: {label}", done, total, note), device=device,
                                  batch_size=calib_batch, checkpoint_dir=checkpoint_dir if calibrated else None,
                                  resume=resume, keep_checkpoint=True, after_stage=meter, train_calib=train_calib,
                                  distill_teacher=distill_teacher)
        except UserError:  # a stage refused its input: a checkpoint with nothing in it would only block the next run
            if checkpoint_dir is not None and checkpoint_dir.is_dir() and {p.name for p in checkpoint_dir.iterdir()} <= {RUN}:
                discard(checkpoint_dir)
            raise
        compress_seconds = time.perf_counter() - tick
        recorded = (history["recipe"] if history else []) + plan.to_list()  # the whole history from the original
        net.hypercompress_source = {"original_params": original_params, "recipe": recorded}  # for a next call
        progress("checking the stored size, KV cache and FLOPs", 0, 1)
        if target is not None:
            try:
                check_stored_size(artifact.stored_bytes(net, lossless) * 8 / original_params, target, say)
            except UserError:
                if checkpoint_dir is not None and checkpoint_dir.exists():  # finished: it would block the next run
                    discard(checkpoint_dir)
                raise
        del meter
        expert_tokens = {str(st["stage"]): st["expert_tokens"] for st in report["stages"] if st.get("expert_tokens")}
        _say_expert_tokens(expert_tokens, say)
        kv_cache = {"before": kv_before, "after": kv_cache_bytes_per_token(net), "dtype": "float32"}
        flops = {"before": flops_before, "after": flops_per_token(net), "context": 512}
        progress("checking the stored size, KV cache and FLOPs", 1, 1)
        summary = {"model": source, "out": str(out_path) if out_path is not None else None,
                   "recipe": recorded, "stages": report["stages"], "original_params": original_params,
                   "load_seconds": round(load_seconds, 2), "compress_seconds": round(compress_seconds, 2),
                   "peak_memory_bytes": max(st["peak_memory_bytes"] for st in report["stages"]),
                   "peak_host_rss_bytes": peak_memory_bytes("cpu"), "streamed": stream_blocks,
                   "device": device, "target_bpw": target and target.bits_per_weight, "allocation": allocation,
                   "teacher": None if teacher is None else teacher if isinstance(teacher, str) else type(teacher).__name__,
                   "protocol": protocol, "kv_cache_bytes_per_token": kv_cache, "flops_per_token": flops,
                   **({"expert_tokens": expert_tokens} if expert_tokens else {})}
        documents_of = lambda size: documents({  # noqa: E731  (the summary, once the weights file's size is known)
            "model": source, "recipe": recorded, "protocol": protocol,
            "target_bpw": target and target.bits_per_weight, "allocation": _with_measured_size(allocation, size),
            "branches": branch_rows(report["stages"], original_params, baseline, size, lossless, earlier),
            "modules": module_rows(weights_before, net), "kv_cache_bytes_per_token": kv_cache,
            "flops_per_token": flops, **({"expert_tokens": expert_tokens} if expert_tokens else {})})
        if out_path is None or not parallel.is_main():  # the other processes of a launched run hold the same model
            size = artifact.stored_bytes(net, lossless)
            summary.update(_totals(net, size, original_params), allocation=_with_measured_size(allocation, size),
                           branches=branch_rows(report["stages"], original_params, baseline, size, lossless, earlier))
            if parallel.is_main():
                progress("logging the summary", 0, 1)
                summary["logged_to"] = _log_summary(summary, plan, log_dir, wandb_project)
                progress("logging the summary", 1, 1)
            _finish(summary, timeline)
            return CompressResult(net, tokenizer, None, summary)
        progress("writing the artifact", 0, 1)
        path = artifact.save(net, tokenizer, out_path, recipe=recorded, original_params=original_params,
                             extra={"source_model": source, "seed": seed}, lossless=lossless, documents=documents_of)
        if checkpoint_dir is not None:
            discard(checkpoint_dir)  # only once the artifact is complete
        manifest = read_manifest_fields(path)  # just written: the totals, without verifying it twice
        summary.update(manifest["totals"], out=str(path),
                       compression_ratio_vs_16bit=16 / manifest["totals"]["bits_per_weight"],
                       allocation=_with_measured_size(allocation, manifest["totals"]["safetensors_bytes"]),
                       branches=json.loads((path / SUMMARY_JSON).read_text())["branches"])
        progress("writing the artifact", 1, 1)
        summary["logged_to"] = _log_summary(summary, plan, log_dir, wandb_project)
        _finish(summary, timeline)
        return CompressResult(net, tokenizer, path, summary)


def _with_measured_size(allocation: dict[str, Any] | None, safetensors_bytes: int) -> dict[str, Any] | None:
    """How a size target was planned, with the written file's bytes beside the size table's
    prediction (the planner's RTN codes; the final codes are GPTQ's or trained)."""
    table = (allocation or {}).get("size_table")
    if not table or not table.get("predicted_rtn_bytes"):
        return allocation
    measured = {"measured_bytes": safetensors_bytes,
                "measured_over_predicted": safetensors_bytes / table["predicted_rtn_bytes"]}
    if table.get("predicted_bytes_at_most"):  # <= 1: the file kept within the room planned for GPTQ's codes
        measured["measured_over_bound"] = safetensors_bytes / table["predicted_bytes_at_most"]
    return {**allocation, "size_table": {**table, **measured}}


def _finish(summary: dict[str, Any], timeline: Timeline) -> None:
    """The timeline's rows (seconds per step, adding up to the call's wall time) into the summary."""
    timeline.finish()
    summary["timeline"] = timeline.rows()
    summary["wall_seconds"] = round(timeline.wall_seconds, 3)


def _target_or_recipe(recipe, method, overrides, bpw, ratio) -> tuple[PlanTarget | None, Recipe | None, list[str]]:
    """(size target, None, the recovery stage's overrides) or (None, recipe with the overrides applied,
    []); UserError for a bad mix."""
    overrides = list(overrides)
    if bpw is not None or ratio is not None:
        if bpw is not None and ratio is not None:
            raise UserError("--target-bpw and --target-ratio were both given; pass only one of them")
        if recipe is not None or method is not None:
            raise UserError("--target-bpw/--target-ratio plan their own recipe; drop --recipe/--method")
        return target_with_overrides(PlanTarget.from_values(bpw, ratio, where="--target-bpw/--target-ratio"), overrides)
    if (recipe is None) == (method is None):
        raise UserError("give exactly one of --recipe FILE or --method NAME (or a size target instead: "
                        "--target-bpw or --target-ratio); pass one of them")
    if method is not None:
        plan: Recipe | PlanTarget = Recipe.single(method)
    elif isinstance(recipe, Recipe):
        plan = recipe
    elif isinstance(recipe, list):
        plan = Recipe.from_list(recipe)
    else:
        plan = load_recipe_file(recipe)
    if isinstance(plan, PlanTarget):
        return target_with_overrides(plan, overrides)
    return None, plan.with_overrides(overrides), []


def _recovery_overrides(plan: Recipe, overrides: list[str], say: Say) -> Recipe:
    """The planned recipe with --set qat.KEY / distill.KEY applied to its recovery stage (the last);
    one naming the other recovery method is skipped with a note."""
    last = plan.stages[-1].method if plan.stages else None
    used = [item for item in overrides if item.partition("=")[0].rpartition(".")[0] == last]
    for item in overrides:
        if item not in used:
            say(f"note: --set {item} not applied: this plan's recovery stage is {last}")
    return plan.with_overrides(used) if used else plan


def _with_keys(plan: Recipe, values: dict[str, Any], override: bool = False, last_only: bool = False) -> Recipe:
    """The recipe with each non-None value set on every stage that has the key: where the stage
    leaves it unset (tracking: a stage's own folder wins), or, `override`, whatever it holds (the
    run's budgets; the recovery stage a size target appended, `last_only`)."""
    from .recipe import _valid_keys

    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return plan
    stages = plan.to_list()
    for index, stage in enumerate(stages):
        if last_only and index != len(stages) - 1:
            continue
        keys = _valid_keys(stage)
        for key, value in values.items():
            if key in keys and (override or not stage.get(key)):
                stage[key] = value
    return Recipe.from_list(stages, where="recipe with the run's training options")


def _check_budgets(steps: int | None, tokens: int | None, minutes: float | None) -> None:
    """Bad budgets are refused before any work."""
    if steps is not None and steps < 1:
        raise UserError(f"--distill-steps {steps}: must be at least 1")
    if tokens is not None and tokens < 1:
        raise UserError(f"--train-tokens {tokens}: must be at least 1 (e.g. 20000000); leave it out for the default")
    if minutes is not None and not (minutes > 0 and minutes < float("inf")):
        raise UserError(f"--max-minutes {minutes}: must be a positive number of minutes (e.g. 10)")


def _check_trained(plan: Recipe | None, distilled: bool, **options: Any) -> None:
    """A training option given to a run whose recipe trains nothing is refused, not ignored."""
    given = [k for k, v in options.items() if v is not None]
    if not given:
        return
    if distilled:
        return
    for key in given:  # distill_steps only goes with --distill; the others are stage keys
        flag = "--" + key.replace("_", "-")
        if key == "distill_steps" or plan is None or not any(
                key in get_method(s.method).config_cls.field_names() for s in plan.stages):
            raise UserError(f"{flag} sets the training of a qat or distill stage, and this run has none; add "
                            f"--distill to a size target, a qat stage to the recipe, or drop {flag}")


def _training_windows(plan: Recipe, model: nn.Module, tokenizer: Any, text: str | None,
                      length: int) -> torch.Tensor | None:
    """Every non-overlapping window of `length` tokens of the calibration text, for the stages that
    train (qat, distill, hypernet): they see all of it, the layer-wise stages --calib-samples
    windows. None without a trained stage or a text."""
    trained = any(getattr(get_method(s.method).method_cls, "trains", False) for s in plan.stages)
    if not trained or text is None or tokenizer is None:
        return None
    return windows(tokenize(tokenizer, text), min(length, position_limit(model.config) or length))


def _log_summary(summary: dict[str, Any], plan: Recipe, log_dir: str | None, wandb_project: str | None) -> list[str]:
    """The summary logged where the run asked (tracking.log_compress_summary); the destinations written."""
    from .tracking import log_compress_summary

    return log_compress_summary(json.loads(json.dumps(summary, default=str)), plan,
                                log_dir=log_dir, wandb_project=wandb_project)


def _say_expert_tokens(by_stage: dict[str, dict[str, Any]], say: Say) -> None:
    """One line per calibrated stage of a mixture of experts: how many experts the calibration text
    routed fewer tokens than the minimum to (those were topped up: experts.py)."""
    for stage, routing in by_stage.items():
        counts = [c for per in routing["experts"].values() for c in per]
        least, fewest = routing["min_tokens"], min(routed for routed, _ in counts)
        short = sum(1 for routed, _ in counts if routed < least)
        if short:
            say(f"stage {stage}: {short} of {len(counts)} experts were routed fewer than {least} calibration tokens "
                f"(fewest {fewest}); each also saw tokens routed elsewhere, up to {least}; per expert: summary.json "
                "expert_tokens")
        else:
            say(f"stage {stage}: every one of {len(counts)} experts was routed at least {least} calibration tokens "
                f"(fewest {fewest}); per expert: summary.json expert_tokens")


def _checked_device(device: str) -> str:
    parallel.check_device(device)
    return parallel.setup(device)  # several processes under torchrun / accelerate launch: this one's GPU


def _loaded(model: str | nn.Module, tokenizer: Any, stream: bool) -> tuple[nn.Module, Any]:
    if stream and isinstance(model, str):
        return load_streamed(model)
    return model_and_tokenizer(model, tokenizer)


def _loaded_teacher(teacher: str | nn.Module | None, teacher_tokenizer: Any, model: nn.Module, tokenizer: Any,
                    calib_len: int, progress: Progress) -> nn.Module | None:
    """Another teacher loaded (a source) and checked against the model: a supported family with an
    output layer, finite weights, the same tokenizer, windows of `calib_len` within its positions."""
    if teacher is None:
        return None
    name = teacher if isinstance(teacher, str) else type(teacher).__name__
    progress(f"loading the teacher {name}", 0, 1)
    try:
        net, teacher_tokenizer = _loaded(teacher, teacher_tokenizer, False)
    except UserError as exc:
        raise UserError(f"--teacher: {exc}") from None
    progress(f"loading the teacher {name}", 1, 1)
    rows = check_teacher_model(model, net)
    check_shared_tokenizer(tokenizer, teacher_tokenizer, rows)
    check_length(net.config, calib_len, "--calib-len (the teacher's positions)")
    return net.eval().requires_grad_(False)


def _meter(model: nn.Module, tokenizer: Any, text: str, name: str, count: int, device: str, progress: Progress
           ) -> tuple[Callable[[nn.Module], dict[str, Any]], str]:
    """The per-branch quality meter on `count` windows of `text` (reporting to `progress` while
    it runs) and its protocol line."""
    if tokenizer is None:
        raise UserError("eval_text needs the model's tokenizer: pass tokenizer= with a loaded model")
    ids = tokenize(tokenizer, text)
    eval_len = min(EVAL_LEN, position_limit(model.config) or EVAL_LEN)  # fits the model
    chunks = windows(ids, eval_len, count)
    protocol = protocol_text(name, eval_len, chunks.shape[0], ids.numel() // eval_len, torch.float32,
                             "the uncompressed model", device)
    meter = BranchMeter(model, chunks, protocol, device=device)

    def measured(net: nn.Module) -> dict[str, Any]:
        section = "measuring perplexity / KL (--eval windows)"
        progress(section, 0, chunks.shape[0])
        return meter(net, progress=lambda done, total: progress(section, done, total))

    return measured, protocol


def _kv_bytes_from_config(config: Any) -> float:
    """Bytes per token of a float32 KV cache for standard attention (keys and values of every
    layer's KV heads): what kv_cache_bytes_per_token measures on the dense original, computed
    when its blocks are still on disk."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return float(2 * layers * kv_heads * head_dim * 4)


def _totals(model: nn.Module, size: int, params: int) -> dict[str, Any]:
    """The totals a saved artifact's manifest gives (artifact.save), for a result kept in memory:
    `size` is the stored bytes of the weights file the model would write."""
    return {"tensor_bits": artifact.storage_bits(model), "safetensors_bytes": size,
            "bits_per_weight": size * 8 / params, "compression_ratio_vs_16bit": params * 16 / (size * 8)}
