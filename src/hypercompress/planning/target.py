"""Size targets: the recipe that brings a model to a whole-model bits-per-weight target as stored.

The planner route (sensitivity.py, mixed_bits.py, size_table.py, fit.py, choice.py) above the quantization floor, the
hybrid pipeline (hybrid.py) below it; the CLI's `compress --target-bpw` and the benchmarks call it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..recipe import PlanTarget, Recipe

from ..progress import Progress, no_progress

Say = Callable[[str], None]
SENSITIVITY = "planning: sensitivity (RTN, KL per module and option)"
JOINT = "planning: whole-model KL of the candidate plans (RTN)"
SIZE_FIT = "planning: fitting the plan to the file (size table: RTN codes per module and option)"
TRIALS = "planning: planned vs uniform recipes (GPTQ trials)"
PIPELINE = "planning: fitting the pipeline to the target (trial compressions)"


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
