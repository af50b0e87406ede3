"""apply_recipe(model, recipe, calib): a recipe's stages applied in order, in place (the step `hypercompress.compress` calls)."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .arch import arch_of, check_length
from .storage.artifact import round_to_storage, storage_bits
from .layerwise import peak_memory_bytes, run_layerwise
from .storage.checkpoint import Checkpoint, fix_hint, unreadable
from .errors import UserError
from .experts import has_unfused_experts, unfuse_experts
from .layers.base import CompressedModule
from .modules import effective_weights, first_non_finite, guard_plain_saves, replace_module, select_linears
from .progress import takes_positional
from .recipe import Recipe
from .methods.base import LayerwiseMethod, WholeModelMethod
from .methods import get_method
from .sources.streaming import materialize_all, uncompressed
from .training.teacher import check_teacher_model, check_teacher_stages

# progress(stage_index, label, done, total, note) (a 4-argument one gets no note): label names the stage (or the stages one layer-wise
# pass runs together, pass_label), done/total count its blocks or modules or steps, note says what
# happens inside (a loss); workflow.compress turns it into the library's progress (progress.py)
Progress = Callable[[int, str, int, int, str], None]


@torch.no_grad()
def _refuse_non_finite_weights(model: nn.Module) -> None:
    """A NaN or inf weight would be rounded into a finite code (or spread through a solver) without
    a word: refuse the model, naming the first such tensor (the stored modules of an earlier run are
    checked when they are saved)."""
    name = first_non_finite(model)
    if name is not None:
        raise UserError(f"the model's tensor {name} holds inf or nan; compress a model whose weights "
                        "are finite (check or re-download its files)")


def check_stages(model: nn.Module, recipe: Recipe) -> None:
    """Every whole-model stage's check_model on `model` (UserError naming the family and the reason):
    run before any work, by compress and by the workflow right after loading."""
    for stage in recipe.stages:
        method = get_method(stage.method).method_cls(stage.config)
        if isinstance(method, WholeModelMethod):
            method.check_model(model)


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None = None,
             progress: Progress | None = None, *, device: str = "cpu", batch_size: int = 8,
             checkpoint_dir: str | Path | None = None, resume: bool = False, keep_checkpoint: bool = False,
             after_stage: Callable[[nn.Module], dict[str, Any]] | None = None,
             train_calib: torch.Tensor | None = None, distill_teacher: nn.Module | None = None) -> dict[str, Any]:
    """Compress `model` in place with every stage of `recipe`; returns a report per stage.

    calib: calibration token windows (N, L), needed by methods with `needs_calibration`; those run
    block by block through `layerwise.run_layerwise` on `device`, checkpointing after each block
    into `checkpoint_dir` when given (whole-model stages keep theirs in it too); `resume` restores
    the last checkpoint and goes on from there (a UserError when it belongs to another run or cannot
    be read; the folder is then left as it is). The folder is removed at the end unless
    `keep_checkpoint` (the CLI removes it once the artifact is written).
    A streamed model (streaming.load_streamed) has its blocks read one at a time by the layer-wise
    passes; a whole-model stage reads all of it first. Tensors no stage compresses are rounded to the artifact's 16-bit storage precision, so the
    returned model and its saved artifact give identical logits. Each stage's report holds the
    model's size after it (stored bits, weights computed with); `after_stage(model)` may add more
    (the CLI measures perplexity and KL there). `train_calib` (M, L): the windows whole-model stages
    that train (qat, distill, hypernet) learn from, when they should see more than `calib` (the
    workflow gives them every window of the calibration text); default `calib`.
    `distill_teacher`: another model sharing the tokenizer that the trained stages (qat, distill;
    every trained stage must be one of them) distil from instead of the original
    (training/teacher.py; the caller checks the tokenizers, workflow.compress does).
    """
    if progress is not None and not takes_positional(progress, 5):  # written before the note existed
        progress = _without_note(progress)
    if calib is not None:
        check_length(model.config, calib.shape[1], "--calib-len")
    if any(getattr(get_method(s.method).method_cls, "whole_model", False) for s in recipe.stages):
        materialize_all(model)  # a streamed model: whole-model stages (and their teacher) need every weight
    _refuse_non_finite_weights(model)
    unfuse_experts(model)  # a mixture of experts: one linear per expert matrix (experts.py)
    if has_unfused_experts(model):  # a plain save_pretrained then writes transformers' fused layout
        guard_plain_saves(model)
    check_stages(model, recipe)  # a family a stage cannot handle is refused before any checkpoint is written
    if distill_teacher is not None:
        check_teacher_stages(get_method(s.method).method_cls for s in recipe.stages)
        check_teacher_model(model, distill_teacher)
    # whole-model methods distil against the model as it was before the first stage that changes
    # its function (exact changes of basis, rotate, come before it, so hidden states compare)
    needs_teacher = any(getattr(cls := get_method(s.method).method_cls, "whole_model", False)
                        and getattr(cls, "needs_teacher", True) for s in recipe.stages)
    teacher = None
    checkpoint = None
    resume_stage = None  # the stage whose layer-wise pass the checkpoint holds a position of
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(Path(checkpoint_dir), _fingerprint(model, recipe, calib, distill_teacher))
        checkpoint.start(resume)
        resume_stage = checkpoint.stage() if resume else None
        _check_resume_stage(recipe, resume_stage, checkpoint.dir)
    restored = None
    report = []
    kept_rows = checkpoint.rows() if checkpoint is not None and resume_stage is not None else {}
    for group in _passes(recipe):
        first = group[0]
        if needs_teacher and teacher is None and not getattr(get_method(recipe.stages[first].method).method_cls,
                                                              "exact", False):
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if resume_stage is not None and first < resume_stage:
            if _replayed_on_resume(recipe.stages[first].method):
                _whole_model(model, recipe.stages[first], first, teacher, calib, device, progress,
                             checkpoint, resume)
            if first in kept_rows:  # reported as the uninterrupted run did
                report.append(kept_rows[first])
            continue  # the other stages' modules come back with the checkpoint
        if resume_stage is not None and first == resume_stage:
            restored = checkpoint.load(model)
        stages = [recipe.stages[i] for i in group]
        methods = [get_method(s.method).method_cls(s.config) for s in stages]
        label = pass_label(stages)
        routes = _routes(model, group, stages, methods, resumed=restored is not None and first == restored[0])
        start, block_seconds, expert_tokens, processes = time.perf_counter(), None, None, 1
        if progress and not isinstance(methods[0], WholeModelMethod):  # (_whole_model says it itself)
            progress(first, label, 0, 1, "starting")  # the pass's time starts now, not at its first module
        if isinstance(methods[0], WholeModelMethod):
            data = train_calib if getattr(methods[0], "trains", False) and train_calib is not None else calib
            methods[0].distill_teacher = distill_teacher if methods[0].takes_distill_teacher else None
            _whole_model(model, stages[0], first, teacher, data, device, progress, checkpoint, resume,
                         methods[0], list(routes))
            peak = peak_memory_bytes(device)
        elif methods[0].needs_calibration:
            if calib is None:
                raise UserError(f"method '{stages[0].method}' needs calibration data; pass --calib FILE")
            resume_from = restored[1:] if restored is not None and first == restored[0] else None
            if resume_from is not None and progress:
                progress(first, label, resume_from[0] + 1, len(model.get_submodule(
                    arch_of(model.config.model_type).blocks)), f"resumed after block {resume_from[0]}")
            run = run_layerwise(
                model, StageRouter(routes, label), list(routes), calib, stage=first, device=device,
                batch_size=batch_size, checkpoint=checkpoint, resume_from=resume_from,
                progress=(lambda done, total: progress(first, label, done, total, "")) if progress else None)
            peak, block_seconds = run["peak_memory_bytes"], run["block_seconds"]
            expert_tokens = run.get("expert_tokens")
            processes = run["processes"]
        else:
            methods[0].run_device = str(device)
            made = methods[0].compress_many(list(routes), lambda name: uncompressed(model, name, first))
            for done, (name, module) in enumerate(made):
                replace_module(model, name, module)
                if progress:
                    progress(first, label, done + 1, len(routes), name)
            peak = peak_memory_bytes("cpu")
        row = {"stage": first, "stages": group, "method": label, "modules": len(routes),
               "seconds": round(time.perf_counter() - start, 3), "peak_memory_bytes": peak,
               **({"block_seconds": block_seconds} if block_seconds is not None else {}),
               **({"expert_tokens": expert_tokens} if expert_tokens is not None else {}),
               **({"calibration_processes": processes} if processes > 1 else {}),
               **_training_report(methods[0]),
               "storage_bits": storage_bits(model), "weights": effective_weights(model),
               **(after_stage(model) if after_stage else {})}
        report.append(row)
        if checkpoint is not None:
            checkpoint.record_row(first, row)  # a resume that skips this pass reports it all the same
    materialize_all(model)  # a streamed model: what no stage compressed, read as it is stored
    round_to_storage(model)  # the model in memory is the model the artifact stores
    guard_plain_saves(model)  # save_pretrained would write a plain config over compressed tensors
    if checkpoint is not None and not keep_checkpoint:
        checkpoint.remove()
    return {"stages": report}


def _training_report(method: Any) -> dict[str, Any]:
    """{"training": what a trained stage did (steps, tokens seen, tokens/s, ...)}, or {}."""
    report = getattr(method, "training_report", None)
    return {"training": report} if report else {}


def _without_note(progress: Callable[[int, str, int, int], None]) -> Progress:
    return lambda stage, label, done, total, note="": progress(stage, label, done, total)


def pass_label(stages: list) -> str:
    """A readable name for the stages one pass runs: "gptq", "sparsegpt+gptq", or for a planned
    recipe's per-option stages "gptq ×5 (w2g64, w3g64, w4g64, w4g128, w8g128)"."""
    runs: list[list[str]] = []
    for stage in stages:
        if runs and runs[-1][0] == stage.method:
            runs[-1].append(stage.method)
        else:
            runs.append([stage.method])
    label = "+".join(run[0] if len(run) == 1 else f"{run[0]} ×{len(run)}" for run in runs)
    configs = [s.config.to_dict() for s in stages]
    options = [f"w{c['bits']}" + ("row" if c.get("group_size") == -1 else f"g{c['group_size']}"
                                  if c.get("group_size") else "")
               for c in configs if isinstance(c.get("bits"), int)]
    return f"{label} ({', '.join(dict.fromkeys(options))})" if len(stages) > 1 and options else label


def _whole_model(model, stage, first, teacher, calib, device, progress, checkpoint, resume,
                 method: WholeModelMethod | None = None, names: list[str] | None = None) -> None:
    """Run whole-model stage `first` (`method` on `names`, or the stage's own selection when
    replayed on resume); its own checkpoint goes to the checkpoint folder's stage{first}/."""
    if method is None:
        method = get_method(stage.method).method_cls(stage.config)
        names = select_linears(model, stage.targets, stage.ignore, method.default_targets)
    if calib is None and method.needs_calibration:
        raise UserError(f"method '{stage.method}' trains on calibration text; pass --calib FILE")
    if checkpoint is not None:
        checkpoint.claim()
    if progress:  # the stage's time starts now (its first own report may come after minutes of setup)
        progress(first, stage.method, 0, 1, "starting")
    method.apply(model, names, teacher, calib, device=device,
                 progress=(lambda done, total, note: progress(first, stage.method, done, total, note))
                 if progress else None,
                 checkpoint_dir=None if checkpoint is None else checkpoint.stage_dir(first), resume=resume)


def _replayed_on_resume(method: str) -> bool:
    """Stages whose result a layer-wise checkpoint does not hold (structural surgery) are run again
    on resume, before the checkpoint's modules are restored; they are deterministic."""
    return getattr(get_method(method).method_cls, "replay_on_resume", False)


def _check_resume_stage(recipe: Recipe, stage: int | None, where: Path) -> None:
    """The checkpoint's stage must start a layer-wise pass of this recipe, and every earlier stage
    must be restorable (its modules are in the checkpoint) or replayable."""
    if stage is None:
        return
    if not any(group[0] == stage and _layerwise_calibrated(recipe.stages[stage].method)
               for group in _passes(recipe)):
        raise unreadable(where, f"it records stage {stage}, which is not a calibrated pass of this recipe")
    for index, earlier in enumerate(recipe.stages[:stage]):
        cls = get_method(earlier.method).method_cls
        if not getattr(cls, "replay_on_resume", False) and not getattr(cls, "restored_from_modules", True):
            raise UserError(f"checkpoint {where} is past stage {index} ({earlier.method}), whose trained "
                            f"tensors a layer-wise checkpoint does not hold; {fix_hint(where)}")


class StageRouter(LayerwiseMethod):
    """Several calibrated stages in one layer-wise pass: each module goes to its stage's method."""

    needs_calibration = True

    def __init__(self, routes: dict[str, LayerwiseMethod], name: str):
        super().__init__(None)
        self.routes, self.name = routes, name

    def observe(self, name: str, x: torch.Tensor) -> None:
        self.routes[name].observe(name, x)

    def observed_bytes(self, name: str, layer: nn.Module) -> int:
        return self.routes[name].observed_bytes(name, layer)

    def statistics(self) -> list[dict] | None:
        """Every routed method's accumulators, or None when one of them cannot add sums."""
        methods = list({id(m): m for m in self.routes.values()}.values())
        tables = [m.statistics() for m in methods]
        return None if any(t is None for t in tables) else [table for t in tables for table in t]

    def compress(self, name: str, layer: nn.Module):
        return self.routes[name].compress(name, layer)

    def compress_many(self, names: list[str], layer_of: Callable[[str], nn.Module]):
        """GPTQ stages' linears fed one input are solved together across stages (a planned
        recipe's per-option stages: q at w3, k and v at w4 in one pass); the rest one by one."""
        from .methods.gptq import GPTQ, solve_shared

        shared = {n: self.routes[n] for n in names if type(self.routes[n]) is GPTQ}
        yield from solve_shared(shared, layer_of)
        for name in names:
            if name not in shared:
                yield name, self.routes[name].compress(name, layer_of(name))


def _passes(recipe: Recipe) -> list[list[int]]:
    """Stage indices grouped into passes: consecutive calibrated stages share one layer-wise pass
    (all their modules compressed block by block, errors propagated); others run alone."""
    groups: list[list[int]] = []
    for index, stage in enumerate(recipe.stages):
        calibrated = _layerwise_calibrated(stage.method)
        if calibrated and groups and _layerwise_calibrated(recipe.stages[groups[-1][-1]].method):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _layerwise_calibrated(method: str) -> bool:
    cls = get_method(method).method_cls
    return cls.needs_calibration and not getattr(cls, "whole_model", False)


def _routes(model: nn.Module, group: list[int], stages, methods, resumed: bool = False
            ) -> dict[str, LayerwiseMethod]:
    """Module name -> its stage's method. Selection skips compressed modules, so a pass resumed from
    its checkpoint finds only those of the blocks still to do (none once all are done)."""
    routes: dict[str, LayerwiseMethod] = {}
    for index, stage, method in zip(group, stages, methods):
        names = select_linears(model, stage.targets, stage.ignore, method.default_targets)
        if not names and not resumed:
            raise UserError(f"stage {index} ({stage.method}) selects no module; check its targets/ignore")
        if isinstance(method, LayerwiseMethod):
            layers = {name: model.get_submodule(name) for name in names}  # (a resumed pass: those still to do)
            method.check_modules({n: m for n, m in layers.items() if not isinstance(m, CompressedModule)})
        for name in names:
            if name in routes:
                raise UserError(f"stage {index} ({stage.method}): '{name}' is already selected by an "
                                "earlier stage; narrow this stage's targets or add it to ignore")
            routes[name] = method
    return routes


def _fingerprint(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None,
                 distill_teacher: nn.Module | None = None) -> str:
    """Identifies (model config, recipe, calibration tokens, another teacher's weights) so a
    checkpoint resumes only its run. A stage's `sharding` is left out: it says how processes split
    the work, not what they compute, so a run resumes sharded or replicated (training/checkpoint.py)."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode())
    stages = [{k: v for k, v in stage.items() if k != "sharding"} for stage in recipe.to_list()]
    digest.update(json.dumps(stages, sort_keys=True).encode())
    if calib is not None:
        digest.update(calib.numpy().tobytes())
    if distill_teacher is not None:
        from .training.corpus import model_fingerprint

        digest.update(f"teacher:{model_fingerprint(distill_teacher)}".encode())
    return digest.hexdigest()
