"""The one verb: compress(model, recipe, calib) applies a recipe's stages in order, in place."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .artifact import round_to_storage, storage_bits
from .calibration import Checkpoint, peak_memory_bytes, run_layerwise
from .errors import UserError
from .modules import effective_weights, replace_module, select_linears, uncompressed
from .recipe import Recipe
from .methods.base import LayerwiseMethod, WholeModelMethod
from .registry import get_method

# progress(stage_index, stage_method, done, total) -- the CLI draws a progress bar from it
Progress = Callable[[int, str, int, int], None]


def compress(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None = None,
             progress: Progress | None = None, *, device: str = "cpu", batch_size: int = 8,
             checkpoint_dir: str | Path | None = None, resume: bool = False,
             after_stage: Callable[[nn.Module], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Compress `model` in place with every stage of `recipe`; returns a report per stage.

    calib: calibration token windows (N, L), needed by methods with `needs_calibration`; those run
    block by block through `calibration.run_layerwise` on `device`, checkpointing after each block
    into `checkpoint_dir` when given; `resume` restores the last checkpoint and goes on from there.
    Tensors no stage compresses are rounded to the artifact's 16-bit storage precision, so the
    returned model and its saved artifact give identical logits. Each stage's report holds the
    model's size after it (stored bits, weights computed with); `after_stage(model)` may add more
    (the CLI measures perplexity and KL there).
    """
    teacher = None  # whole-model methods distil against the model as it was before the first stage
    if any(getattr(cls := get_method(s.method).method_cls, "whole_model", False)
           and getattr(cls, "needs_teacher", True) for s in recipe.stages):
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    checkpoint = None
    restored = None
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(Path(checkpoint_dir), _fingerprint(model, recipe, calib))
        restored = checkpoint.load(model) if resume else None
    report = []
    for group in _passes(recipe):
        first = group[0]
        if restored is not None and first < restored[0]:
            continue  # these stages' modules came back with the checkpoint
        stages = [recipe.stages[i] for i in group]
        methods = [get_method(s.method).method_cls(s.config) for s in stages]
        label = "+".join(s.method for s in stages)
        routes = _routes(model, group, stages, methods)
        start = time.perf_counter()
        if isinstance(methods[0], WholeModelMethod):
            if calib is None:
                raise UserError(f"method '{stages[0].method}' trains on calibration text; pass --calib FILE")
            methods[0].apply(model, list(routes), teacher, calib, device=device,
                             progress=(lambda done, total, note: progress(first, f"{label} | {note}", done, total))
                             if progress else None,
                             checkpoint_dir=checkpoint_dir, resume=resume)
            peak = peak_memory_bytes(device)
        elif methods[0].needs_calibration:
            if calib is None:
                raise UserError(f"method '{stages[0].method}' needs calibration data; pass --calib FILE")
            resume_from = restored[1:] if restored is not None and first == restored[0] else None
            run = run_layerwise(
                model, StageRouter(routes, label), list(routes), calib, stage=first, device=device,
                batch_size=batch_size, checkpoint=checkpoint, resume_from=resume_from,
                progress=(lambda done, total: progress(first, label, done, total)) if progress else None)
            peak = run["peak_memory_bytes"]
        else:
            made = methods[0].compress_many(list(routes), lambda name: uncompressed(model, name, first))
            for done, (name, module) in enumerate(made):
                replace_module(model, name, module)
                if progress:
                    progress(first, label, done + 1, len(routes))
            peak = peak_memory_bytes("cpu")
        report.append({"stage": first, "stages": group, "method": label, "modules": len(routes),
                       "seconds": round(time.perf_counter() - start, 3), "peak_memory_bytes": peak,
                       "storage_bits": storage_bits(model), "weights": effective_weights(model),
                       **(after_stage(model) if after_stage else {})})
    round_to_storage(model)  # the model in memory is the model the artifact stores
    if checkpoint is not None:
        checkpoint.remove()
    return {"stages": report}


class StageRouter(LayerwiseMethod):
    """Several calibrated stages in one layer-wise pass: each module goes to its stage's method."""

    needs_calibration = True

    def __init__(self, routes: dict[str, LayerwiseMethod], name: str):
        super().__init__(None)
        self.routes, self.name = routes, name

    def observe(self, name: str, x: torch.Tensor) -> None:
        self.routes[name].observe(name, x)

    def compress(self, name: str, layer: nn.Module):
        return self.routes[name].compress(name, layer)


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


def _routes(model: nn.Module, group: list[int], stages, methods) -> dict[str, LayerwiseMethod]:
    routes: dict[str, LayerwiseMethod] = {}
    for index, stage, method in zip(group, stages, methods):
        names = select_linears(model, stage.targets, stage.ignore)
        if not names:
            raise UserError(f"stage {index} ({stage.method}) selects no module; check its targets/ignore")
        if isinstance(method, LayerwiseMethod):
            method.check_modules({name: model.get_submodule(name) for name in names})
        for name in names:
            if name in routes:
                raise UserError(f"stage {index} ({stage.method}): '{name}' is already selected by an "
                                "earlier stage; narrow this stage's targets or add it to ignore")
            routes[name] = method
    return routes


def _fingerprint(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None) -> str:
    """Identifies (model config, recipe, calibration tokens) so a checkpoint resumes only its run."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(json.dumps(recipe.to_list(), sort_keys=True).encode())
    if calib is not None:
        digest.update(calib.numpy().tobytes())
    return digest.hexdigest()
