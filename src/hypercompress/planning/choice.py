"""The planner never loses to a uniform recipe of the same size: both are compressed, the better kept.

A mixed plan is chosen from single-module RTN sensitivities and a joint RTN measurement
(mixed_bits.py); the final codes are GPTQ's, whose gains differ by option (largest at 2-3 bits), so a
plan that wins under RTN can lose under GPTQ to one bit-width everywhere (SmolLM2 at 3.0 bpw: the
plan 119 against uniform w3 g64 113, issue 14). So the largest uniform recipes whose files fit the
target (every block linear at one (bits, group) option, the embedding at the largest option that
still fits, as the size table predicts; at most `UNIFORM_KEPT` linear options, the largest first)
are compressed as the plan is, with GPTQ on the first `TRIAL_WINDOWS` calibration windows, and each
is scored by the measured KL(original || compressed) on up to `CHECK_WINDOWS` further calibration
windows (text the trials did not use; never the evaluation text). The lowest KL wins, the plan on
ties; the scores are reported with the choice.

The trials share their work (`shared_gptq`): every candidate quantizes the same modules of the same
original weights, so each block linear's Hessian is taken once, from the original model's inputs
on the trial windows (one forward pass for all candidates), and each (module, option) is solved
once however many candidates use it. The final run propagates each block's quantization error into
the next block's inputs (sequential GPTQ); the trials do not (GPTQ's paper quantizes both ways with
about equal results); what decides is still each candidate's KL measured end to end with every
module compressed. On SmolLM2 at 3.0 bpw this is 4 GPTQ passes' work cut to one forward and the
distinct solves (benchmarks/RESULTS.md: the planner's time table).

On a model with an untied lm_head and RMSNorm blocks, the plan is also tried after `rotate` (the
residual stream's orthogonal invariance folded into the weights, QuaRot R1 / SliceGPT): the same
modules at the same options, so about the same stored size (that trial is compressed on its own,
its file measured, and one larger than both the plan's and the target is not kept). A tied model
is not rotated here: rotation unties its head, whose table would then be stored beside the
embedding's.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..arch import arch_of
from ..modules import count_params
from .mixed_bits import MixedBitsPlanner, Plan, linear_options, option_label, plan_recipe
from .size_table import SizeTable

UNIFORM_KEPT = 2     # uniform candidates compressed beside the plan
TRIAL_WINDOWS = 8    # calibration windows each trial's GPTQ sees (the final run sees them all)
CHECK_WINDOWS = 4    # calibration windows after those that score each trial
FIT_SLACK = 1.02     # a candidate whose file, estimated from its tensor bits, is this far over is not sized
ROTATED = "rotated: planned"  # the plan after `rotate`, on models rotate keeps the same size


def rotation_keeps_size(model: nn.Module) -> bool:
    """Whether `rotate` leaves the stored size alone: an RMSNorm architecture whose lm_head is untied."""
    from ..arch import ARCHITECTURES

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    spec = ARCHITECTURES.get(model.config.model_type)
    return (spec is not None and spec.rotatable and head is not None
            and getattr(head, "weight", None) is not getattr(embedding, "weight", None))


def candidate_stages(label: str, plan: Plan, embedding: str) -> list[dict]:
    """The recipe stages of a candidate: the plan's, after `rotate` for the rotated one."""
    return ([{"method": "rotate"}] if label == ROTATED else []) + plan_recipe(plan, embedding)


def uniform_plans(planner: MixedBitsPlanner, table: SizeTable, target_bpw: float,
                  coding_ratio: float = 1.0) -> list[Plan]:
    """The largest uniform plans whose files store at most `target_bpw` (the size table's bound):
    for each block-linear option below 8 bits that every linear takes (largest first), the largest
    embedding option that fits. Combinations whose tensor bits x `coding_ratio` (file / tensor bits
    of the fitted plan) lie more than FIT_SLACK over the target are not sized. At most UNIFORM_KEPT."""
    costs, embedding, params = planner.costs, planner.embedding, planner.params
    linears = [n for n in planner.candidates if n != embedding]
    offered = [o for o in linear_options(planner.group) if o[0] < 8 and all(o in costs[n] for n in linears)]
    found: list[Plan] = []
    for option in sorted(offered, key=lambda o: -sum(costs[n][o] for n in linears)):
        linear_bits = planner.fixed + sum(costs[n][option] for n in linears)
        for choice in sorted(costs[embedding], key=lambda o: -costs[embedding][o]):
            planned = linear_bits + costs[embedding][choice]
            if planned * coding_ratio > target_bpw * params * FIT_SLACK:
                continue
            plan = Plan({**{n: option for n in linears}, embedding: choice}, {}, planned, params)
            plan.predicted_bytes = table.file_bytes(plan.allocation)
            if table.bound_bits_per_weight(plan.allocation) <= target_bpw:
                found.append(plan)
                break
        if len(found) == UNIFORM_KEPT:
            break
    return found


def plan_label(plan: Plan, embedding: str) -> str:
    options = {o for n, o in plan.allocation.items() if n != embedding}
    linears = option_label(next(iter(options))) if len(options) == 1 else "mixed"
    return f"linears {linears}, embedding {option_label(plan.allocation[embedding])}"


@torch.no_grad()
def choose(model: nn.Module, plan: Plan, uniforms: list[Plan], target_bpw: float, samples: torch.Tensor,
           embedding: str, lossless: int | None, device: str = "cpu",
           progress: Callable[..., None] | None = None) -> tuple[Plan, dict[str, float], dict[str, Plan]]:
    """(the plan or one of `uniforms` (plans of at most the same file size), whichever gives the
    lowest KL after GPTQ; {label: KL} of every candidate, the plan's as "planned"; {label: plan}).
    `samples` (N, T): the calibration windows (with fewer than TRIAL_WINDOWS + 1, the first half
    calibrates the trials and the rest scores them). Everything runs on `device`.
    progress(done, total, note) as the trials go: the shared pass's blocks, then one per candidate."""
    from ..storage.artifact import round_to_storage, stored_bytes
    from ..training.kl import kl_to_teacher
    from .trials import rotated_trial, shared_gptq, trial_model

    split = min(TRIAL_WINDOWS, max(1, samples.shape[0] // 2))
    check = samples[split:split + CHECK_WINDOWS] if samples.shape[0] > 1 else samples
    candidates = {"planned": plan}
    for uniform in uniforms:
        candidates[f"uniform: {plan_label(uniform, embedding)}"] = uniform
    rotated = rotation_keeps_size(model)
    if rotated:
        candidates[ROTATED] = plan
    blocks = len(model.get_submodule(arch_of(model.config.model_type).blocks))
    total = blocks + len(candidates)

    def step(done: int, note: str) -> None:
        if progress:
            progress(done, total, note)

    model.to(device)
    reference = [model(input_ids=w.to(device)).logits.float().cpu() for w in check.split(2)]
    model.to("cpu")
    wanted = {(n, o) for p in candidates.values() for n, o in p.allocation.items() if n != embedding}
    solved = shared_gptq(model, wanted, samples[:split], device,
                         progress=lambda block: step(block, f"shared GPTQ pass, {len(wanted)} module options"))
    scores: dict[str, float] = {}
    for done, (label, candidate) in enumerate(candidates.items()):
        step(blocks + done, f"scoring {label}")
        if label == ROTATED:
            trial = rotated_trial(model, candidate_stages(label, candidate, embedding), samples[:split], device)
            allowed = max(stored_bytes(trial_model(model, plan, embedding, solved), lossless),
                          target_bpw * count_params(model) / 8)
            if stored_bytes(trial, lossless) > allowed:  # its codes may code larger: not kept
                continue
        else:
            trial = trial_model(model, candidate, embedding, solved)
        round_to_storage(trial)
        trial.to(device)
        kls = [kl_to_teacher(r, trial(input_ids=w.to(device)).logits.float().cpu()) * w.shape[0]
               for r, w in zip(reference, check.split(2))]
        scores[label] = float(sum(kls)) / check.shape[0]
        del trial
    step(total, "done")
    best = min(scores, key=lambda label: (scores[label], label != "planned"))
    return candidates[best], scores, candidates
