"""Size targets, from the option to the stored file: `PlanTarget` (--target-bpw / --target-ratio, or
a planner recipe file: `load_recipe_file`), `target_with_overrides` (its --set values), `planned_recipe`
(the recipe that brings a model to a whole-model bits-per-weight target as stored) and
`check_stored_size` (the written file against the target).

The planner route (sensitivity.py, mixed_bits.py, size_table.py, fit.py, choice.py) above the quantization floor, the
hybrid pipeline (hybrid.py) below it; `hypercompress.compress` (workflow.py) and the benchmarks call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..recipe import Recipe, read_yaml

from ..progress import Progress, no_progress

Say = Callable[[str], None]
SENSITIVITY = "planning: sensitivity (RTN, KL per module and option)"
JOINT = "planning: whole-model KL of the candidate plans (RTN)"
SIZE_FIT = "planning: fitting the plan to the file (size table: RTN codes per module and option)"
TRIALS = "planning: planned vs uniform recipes (GPTQ trials)"
PIPELINE = "planning: fitting the pipeline to the target (trial compressions)"


@dataclass
class PlanTarget:
    """A size target for the budget planner: whole-model bits per weight and the grouped options' size."""
    bits_per_weight: float
    group_size: int = 64

    @classmethod
    def from_values(cls, bpw: float | None, ratio: float | None, group_size: Any = 64,
                    where: str = "target") -> "PlanTarget":
        if (bpw is None) == (ratio is None):
            raise UserError(f"{where}: give exactly one of target_bpw (--target-bpw) or "
                            "target_ratio (--target-ratio)")
        try:
            value, group = float(ratio if bpw is None else bpw), int(group_size)
        except (TypeError, ValueError):
            raise UserError(f"{where}: target and group_size must be numbers; e.g. target_bpw: 3.0") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: target {value} is not a finite number; e.g. --target-bpw 3.0")
        if ratio is not None:
            if value <= 1:
                raise UserError(f"{where}: target ratio {value} must be above 1 (the size ratio vs 16-bit); "
                                "e.g. --target-ratio 4")
            value = 16 / value
        if not 0 < value < 16:
            raise UserError(f"{where}: target {value} bpw must be above 0 and below 16 (the original's "
                            "16-bit size); e.g. --target-bpw 3.0")
        if group < 2:
            raise UserError(f"{where}: group_size={group} must be at least 2 (a scale per weight costs more "
                            "than float16); e.g. group_size=64")
        return cls(value, group)


def load_recipe_file(path: str | Path) -> "Recipe | PlanTarget":
    """A YAML recipe: a list of stages (Recipe) or a planner mapping with target_bpw/target_ratio."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict) and ({"target_bpw", "target_ratio"} & set(data)):
        unknown = set(data) - {"target_bpw", "target_ratio", "group_size", "name"}
        if unknown:
            raise UserError(f"{path.name}: unknown planner key(s) {', '.join(sorted(unknown))}; "
                            "valid: target_bpw, target_ratio, group_size, name")
        return PlanTarget.from_values(data.get("target_bpw"), data.get("target_ratio"),
                                      data.get("group_size", 64), where=path.name)
    return Recipe.from_list(data, where=path.name)


RECOVERY_METHODS = ("qat", "distill")  # the stages --distill appends to a planned recipe
PLANNED_KEYS = ("bits", "group_size", "symmetric", "zero_point", "embedding_bits", "targets", "ignore")


def target_with_overrides(target: PlanTarget, overrides: list[str]) -> tuple[PlanTarget, None, list[str]]:
    """A target accepts group_size=G (the size of the grouped options) and, for the recovery stage
    --distill appends, qat.KEY=VALUE / distill.KEY=VALUE (checked here against that method's keys,
    applied once the plan is made)."""
    group, recovery = target.group_size, []
    for item in overrides:
        key, _, value = item.partition("=")
        scope = key.rpartition(".")[0]
        if scope in RECOVERY_METHODS:
            if key.rpartition(".")[2] in PLANNED_KEYS:
                raise UserError(f"--set {item}: the plan decides each module's grid and what the recovery "
                                "trains; set its training keys only (e.g. qat.corpus_tokens), or use --recipe")
            Recipe.single(scope).with_overrides([item])  # an unknown key or a bad value is refused now
            recovery.append(item)
            continue
        if key != "group_size":
            raise UserError(f"--set {item}: with a size target only group_size=G and the recovery stage's "
                            "qat.KEY=VALUE or distill.KEY=VALUE can be set; drop the other --set values or use --recipe")
        group = value
    return PlanTarget.from_values(target.bits_per_weight, None, group, where="--set group_size"), None, recovery


def check_stored_size(bpw: float, target: PlanTarget, say: Say) -> None:
    """A size target is never exceeded by more than 2% (the file's bytes, lossless stage included):
    the planner fits its size table's file (RTN codes, with room for GPTQ's per option:
    planning.size_table.GPTQ_CODE_GROWTH) to [target - 2%, target], and the written codes may code a little differently,
    so the file is checked again. A file further under the target is kept with
    a note: a distill plan leaves qat's trained codes room to code larger (planning.mixed_bits.QAT_CODE_GROWTH),
    and codes that trained less than that room leave it unused."""
    ratio = bpw / target.bits_per_weight
    if ratio > 1.02:
        raise UserError(f"the compressed file stores {bpw:.4f} bpw ({16 / bpw:.2f}x), over the target "
                        f"{target.bits_per_weight:.4f} bpw ({16 / target.bits_per_weight:.2f}x) by more than 2% "
                        f"(the written file codes unlike the planner's size trial); ask for a target near "
                        f"{bpw:.3f} bpw, e.g. --target-bpw {bpw:.3f}")
    if ratio > 1:
        say(f"note: the file stores {bpw:.4f} bpw, {ratio - 1:.2%} over the target {target.bits_per_weight:.4f} "
            f"(its codes coded larger than the planner's allowance; within the 2% compress accepts)")
    if ratio < 0.98:
        say(f"note: the file stores {bpw:.4f} bpw, {1 - ratio:.1%} under the target "
            f"{target.bits_per_weight:.4f} (the codes coded smaller than the planner allowed for)")


def planned_recipe(model: nn.Module, target: PlanTarget, samples: torch.Tensor, distill_steps: int = 0,
                   lossless: int | None = None, device: str = "cpu", say: Say | None = None,
                   progress: Progress | None = None) -> tuple[Recipe, dict[str, Any]]:
    """The recipe that brings `model` to `target` (whole-model bits per weight as stored), and how it
    was chosen (route, planned bpw, notes, trial KLs, options, sensitivities).

    samples: (N, T) calibration token ids. When the smallest quantization plan's file (every module at
    its fewest bits, as the size table bounds it) fits the target: measure sensitivities on the
    first 256 tokens of one calibration window, plan per-module options, fit the plan to the file it
    writes (header and lossless stage counted), then keep it or the best uniform recipe of that size,
    whichever GPTQ trials measure better (choice.py); else: the hybrid pipeline
    (hybrid.py). `distill_steps` > 0 appends a qat stage and fits the plan to target /
    mixed_bits.QAT_CODE_GROWTH. `say(line)` receives what was decided, `progress(section, done, total,
    note)` the long steps as they run (sections SENSITIVITY, JOINT, SIZE_FIT, TRIALS or PIPELINE). Raises UserError for a target no plan of this model can meet."""
    say = say or (lambda _line: None)
    progress = progress or no_progress
    from .choice import candidate_stages, choose, uniform_plans
    from .fit import fit_plan_to_file, smallest_file_fits
    from .hybrid import fit_pipeline
    from .mixed_bits import QAT_CODE_GROWTH, MixedBitsPlanner, option_label, qat_stage
    from .size_table import SizeTable

    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    planner = MixedBitsPlanner(model, samples[:1, :256], target.group_size, embedding, device=device,
                               progress=lambda done, total, phase="": progress(JOINT if phase == "joint" else SENSITIVITY,
                                                                                done, total))
    floor = planner.floor_bits / planner.params
    # GPTQ writes the block linears' codes, which code a little larger than RTN's (the table's bound)
    table = SizeTable(model, planner.candidates, lossless, grown=[n for n in planner.candidates if n != embedding])
    # qat's trained codes code larger than the planned ones: its plans leave them that room
    fit_bpw = target.bits_per_weight / QAT_CODE_GROWTH if distill_steps else target.bits_per_weight
    if not smallest_file_fits(planner, table, fit_bpw):  # no quantization plan is that small: the pipeline
        del table, planner
        progress(PIPELINE, 0, 1)
        pipeline = fit_pipeline(model, target.bits_per_weight, samples, distill_steps, lossless, device=device,
                                progress=lambda done, most, note: progress(PIPELINE, done, most, note))
        progress(PIPELINE, 1, 1)
        say(f"pipeline for {target.bits_per_weight:.4f} bpw (below the smallest quantization plan's file; "
            f"tensor-bit floor {floor:.3f}): {pipeline.reached_bpw:.4f} bpw as stored | " + " | ".join(pipeline.notes))
        return (Recipe.from_list(pipeline.stages, where="pipeline recipe"),
                {"route": "pipeline", "planned_bits_per_weight": pipeline.reached_bpw,
                 "quantization_floor_bpw": floor, "notes": pipeline.notes})
    progress(SENSITIVITY, 0, 1, "the original's logits on the probe window")
    try:
        plan = fit_plan_to_file(planner, table, fit_bpw,
                                progress=lambda done, families, note: progress(SIZE_FIT, done, families, note),
                                hint_scale=target.bits_per_weight / fit_bpw)
    except UserError as error:
        if not distill_steps:
            raise
        raise UserError(f"{error} (with --distill the plan is fit to the target / {QAT_CODE_GROWTH}, "
                        f"{fit_bpw:.4f} bpw, since qat's trained codes code up to that much larger; the "
                        f"targets named allow for that)") from None
    planner.release()
    progress(TRIALS, 0, 1, "sizing the uniform candidates")
    uniforms = uniform_plans(planner, table, fit_bpw, plan.predicted_bytes * 8 / plan.planned_bits)
    fitted = plan
    plan, scores, candidates = choose(model, plan, uniforms, fit_bpw, samples, embedding, lossless, device,
                                      progress=lambda done, total, note="": progress(TRIALS, done, total, note))
    chosen = min(scores, key=lambda label: (scores[label], label != "planned"))
    say("GPTQ trials, KL on calibration windows they did not see: "
                  + " | ".join(f"{label} {kl:.4f}" + (" (kept)" if label == chosen else "")
                               for label, kl in scores.items()))
    counts: dict[tuple[int, int], int] = {}
    for name, option in plan.allocation.items():
        if name != embedding:
            counts[option] = counts.get(option, 0) + 1
    summary = (f"embedding {option_label(plan.allocation[embedding])} | linears: "
               + ", ".join(f"{option_label(o)} x{c}" for o, c in sorted(counts.items())))
    room = f" (the target {target.bits_per_weight:.3f} / {QAT_CODE_GROWTH}: room for qat's codes)" if distill_steps else ""
    say(f"plan for {fit_bpw:.3f} bpw as stored{room}: {plan.bits_per_weight:.3f} bpw of tensors "
                  f"planned | {summary}")
    allocation = {"route": "planner", "target_bpw": target.bits_per_weight, "fit_bpw": fit_bpw,
                  "planned_bits_per_weight": plan.bits_per_weight,
                  "notes": [summary.replace(" | ", "; "), f"kept: {chosen}"]
                  + ([f"quantization-aware distillation {distill_steps} steps"] if distill_steps else []),
                  "trial_kl": scores,
                  "trial_recipes": {label: candidate_stages(label, p, embedding) for label, p in candidates.items()},
                  "options": {n: option_label(o) for n, o in plan.allocation.items()},
                  "sensitivity_kl": {n: {option_label(o): v for o, v in s.items()}
                                     for n, s in planner.sensitivity.items()},
                  "joint_kl": fitted.candidates or {},
                  "size_table": {"predicted_rtn_bytes": plan.predicted_bytes,
                                 "predicted_bytes_at_most": table.bound_bytes(plan.allocation),
                                 "lossless": lossless}}
    stages = candidate_stages(chosen, plan, embedding)
    if distill_steps:  # latent weights, scales, the embedding and norms trained through the codes
        stages.append(qat_stage(distill_steps))
    return Recipe.from_list(stages, where="planned recipe"), allocation
