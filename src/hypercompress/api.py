"""The one verb: compress(model, recipe, calib) applies a recipe's stages in order, in place."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .artifact import round_to_storage
from .calibration import Checkpoint, peak_memory_bytes, run_layerwise
from .errors import UserError
from .modules import replace_module, select_linears, uncompressed
from .recipe import Recipe
from .registry import get_method

# progress(stage_index, stage_method, done, total) -- the CLI draws a progress bar from it
Progress = Callable[[int, str, int, int], None]


def compress(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None = None,
             progress: Progress | None = None, *, device: str = "cpu", batch_size: int = 8,
             checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Compress `model` in place with every stage of `recipe`; returns a report per stage.

    calib: calibration token windows (N, L), needed by methods with `needs_calibration`; those run
    block by block through `calibration.run_layerwise` on `device`, checkpointing after each block
    into `checkpoint_dir` when given; `resume` restores the last checkpoint and goes on from there.
    Tensors no stage compresses are rounded to the artifact's 16-bit storage precision, so the
    returned model and its saved artifact give identical logits.
    """
    checkpoint = None
    restored = None
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(Path(checkpoint_dir), _fingerprint(model, recipe, calib))
        restored = checkpoint.load(model) if resume else None
    report = []
    for index, stage in enumerate(recipe.stages):
        if restored is not None and index < restored[0]:
            continue  # this stage's modules came back with the checkpoint
        method = get_method(stage.method).method_cls(stage.config)
        names = select_linears(model, stage.targets, stage.ignore)
        if not names:
            raise UserError(f"stage {index} ({stage.method}) selects no module; check its targets/ignore")
        start = time.perf_counter()
        if method.needs_calibration:
            if calib is None:
                raise UserError(f"method '{stage.method}' needs calibration data; pass --calib FILE")
            resume_from = restored[1:] if restored is not None and index == restored[0] else None
            run = run_layerwise(
                model, method, names, calib, stage=index, device=device, batch_size=batch_size,
                checkpoint=checkpoint, resume_from=resume_from,
                progress=(lambda done, total: progress(index, stage.method, done, total)) if progress else None)
            peak = run["peak_memory_bytes"]
        else:
            for done, name in enumerate(names):
                replace_module(model, name, method.compress(name, uncompressed(model, name, index)))
                if progress:
                    progress(index, stage.method, done + 1, len(names))
            peak = peak_memory_bytes("cpu")
        report.append({"stage": index, "method": stage.method, "modules": len(names),
                       "seconds": round(time.perf_counter() - start, 3), "peak_memory_bytes": peak})
    round_to_storage(model)  # the model in memory is the model the artifact stores
    if checkpoint is not None:
        checkpoint.remove()
    return {"stages": report}


def _fingerprint(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None) -> str:
    """Identifies (model config, recipe, calibration tokens) so a checkpoint resumes only its run."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(json.dumps(recipe.to_list(), sort_keys=True).encode())
    if calib is not None:
        digest.update(calib.numpy().tobytes())
    return digest.hexdigest()
