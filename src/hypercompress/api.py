"""The one verb: compress(model, recipe) applies a recipe's stages in order, in place."""

from __future__ import annotations

import time
from typing import Any, Callable

from torch import nn

from .artifact import round_to_storage
from .errors import UserError
from .modules import LINEAR_TYPES, CompressedModule, select_linears, replace_module
from .recipe import Recipe
from .registry import get_method

# progress(stage_index, stage_method, done, total) -- the CLI draws a progress bar from it
Progress = Callable[[int, str, int, int], None]


def compress(model: nn.Module, recipe: Recipe, calib: Any = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Compress `model` in place with every stage of `recipe`; returns a report per stage.

    Tensors no stage compresses are rounded to the artifact's 16-bit storage precision, so the
    returned model and its saved artifact give identical logits.

    calib: calibration token windows (N, L) for methods that need them; refused for now by methods
    with `needs_calibration` when absent.
    """
    report = []
    for index, stage in enumerate(recipe.stages):
        entry = get_method(stage.method)
        method = entry.method_cls(stage.config)
        if method.needs_calibration and calib is None:
            raise UserError(f"method '{stage.method}' needs calibration data; pass --calib FILE")
        names = select_linears(model, stage.targets, stage.ignore)
        if not names:
            raise UserError(f"stage {index} ({stage.method}) selects no module; check its targets/ignore")
        start = time.perf_counter()
        for done, name in enumerate(names):
            layer = model.get_submodule(name)
            if isinstance(layer, CompressedModule) or not isinstance(layer, LINEAR_TYPES):
                raise UserError(f"stage {index} ({stage.method}): '{name}' is already compressed by an "
                                "earlier stage; narrow this stage's targets or add it to ignore")
            replace_module(model, name, method.compress(name, layer))
            if progress:
                progress(index, stage.method, done + 1, len(names))
        report.append({"stage": index, "method": stage.method, "modules": len(names),
                       "seconds": round(time.perf_counter() - start, 3)})
    round_to_storage(model)  # the model in memory is the model the artifact stores
    return {"stages": report}
