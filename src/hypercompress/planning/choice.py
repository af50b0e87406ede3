"""The planner never loses to a uniform recipe of the same size: both are compressed, the better kept.

A mixed plan is chosen from single-module RTN sensitivities and a joint RTN measurement
(mixed_bits.py); the final codes are GPTQ's, whose gains differ by option (largest at 2-3 bits), so a
plan that wins under RTN can lose under GPTQ to one bit-width everywhere (SmolLM2 at 3.0 bpw: the
plan 119 against uniform w3 g64 113, issue 14). So the largest uniform recipes whose files fit the
target (every block linear at one (bits, group) option, the embedding at the largest option that
still fits; at most `UNIFORM_KEPT` linear options, the largest first) are compressed as the plan
is, with GPTQ on the first `TRIAL_WINDOWS` calibration windows, and each is scored by the measured
KL(original || compressed) on up to `CHECK_WINDOWS` further calibration windows (text the trials
did not use; never the evaluation text). The lowest KL wins, the plan on ties; the scores are reported with the choice.

On a model with an untied lm_head and RMSNorm blocks, the plan is also tried after `rotate` (the
residual stream's orthogonal invariance folded into the weights, QuaRot R1 / SliceGPT): the same
modules at the same options, so about the same stored size (the rotated trial's file is measured,
and one larger than both the plan's and the target is not kept). A tied model is not rotated here:
rotation unties its head, whose table would then be stored beside the embedding's.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..arch import arch_of
from ..modules import count_params
from .mixed_bits import Plan, candidate_options, linear_options, option_label, plan_recipe

UNIFORM_KEPT = 2     # uniform candidates compressed beside the plan
TRIAL_WINDOWS = 8    # calibration windows each trial's GPTQ sees (the final run sees them all)
CHECK_WINDOWS = 4    # calibration windows after those that score each trial
FIT_SLACK = 1.02     # a candidate whose predicted file is this far over the target is not tried
ROTATED = "rotated: planned"  # the plan after `rotate`, on models rotate keeps the same size


def rotation_keeps_size(model: nn.Module) -> bool:
    """Whether `rotate` leaves the stored size alone: an RMSNorm architecture whose lm_head is untied."""
    from ..methods.rotation import ROTATABLE

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return (model.config.model_type in ROTATABLE and head is not None
            and getattr(head, "weight", None) is not getattr(embedding, "weight", None))


def candidate_stages(label: str, plan: Plan, embedding: str) -> list[dict]:
    """The recipe stages of a candidate: the plan's, after `rotate` for the rotated one."""
    return ([{"method": "rotate"}] if label == ROTATED else []) + plan_recipe(plan, embedding)


def uniform_plans(model: nn.Module, target_bpw: float, group: int, embedding: str, lossless: int | None,
                  coding_ratio: float) -> list[Plan]:
    """The largest uniform plans whose files store at most `target_bpw`: for each block-linear
    option below 8 bits (largest first), the largest embedding option that fits; the file of each is
    predicted as its tensor bits x `coding_ratio` (file / tensor bits of the fitted plan) and then
    measured by the planner's RTN size trial. At most UNIFORM_KEPT plans."""
    from .fit import stored_bpw

    params = count_params(model)
    candidates, embed_name, costs, fixed = candidate_options(model, group, embedding)
    linears = [n for n in candidates if n != embed_name]
    found: list[Plan] = []
    offered = [o for o in linear_options(group) if o[0] < 8 and all(o in candidates[n] for n in linears)]
    for option in sorted(offered,
                         key=lambda o: -sum(costs[n][o] for n in linears)):
        linear_bits = fixed + sum(costs[n][option] for n in linears)
        for choice in sorted(candidates[embed_name], key=lambda o: -costs[embed_name][o]):
            planned = linear_bits + costs[embed_name][choice]
            if planned * coding_ratio > target_bpw * params * FIT_SLACK:
                continue
            plan = Plan({**{n: option for n in linears}, embed_name: choice}, {}, planned, params)
            if stored_bpw(model, plan, embed_name, lossless) <= target_bpw:
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
def choose(model: nn.Module, plan: Plan, target_bpw: float, samples: torch.Tensor, group: int, embedding: str,
           lossless: int | None, device: str = "cpu",
           progress: Callable[..., None] | None = None) -> tuple[Plan, dict[str, float], dict[str, Plan]]:
    """(the plan or a uniform plan of at most the same file size, whichever gives the lowest KL
    after GPTQ; {label: KL} of every candidate, the plan's as "planned"; {label: plan}). `samples` (N, T): the
    calibration windows (with fewer than TRIAL_WINDOWS + 1, the first half calibrates the trials and
    the rest scores them). progress(done, total, note) as the trials' layer-wise passes go: done /
    total count blocks over all trials, the note names the running trial."""
    from ..api import compress
    from ..artifact import stored_bytes
    from ..distill import kl_to_teacher
    from .fit import stored_bpw
    from ..recipe import Recipe

    split = min(TRIAL_WINDOWS, max(1, samples.shape[0] // 2))
    check = samples[split:split + CHECK_WINDOWS] if samples.shape[0] > 1 else samples
    ratio = stored_bpw(model, plan, embedding, lossless) * count_params(model) / plan.planned_bits
    candidates = {"planned": plan}
    for uniform in uniform_plans(model, target_bpw, group, embedding, lossless, ratio):
        candidates[f"uniform: {plan_label(uniform, embedding)}"] = uniform
    if rotation_keeps_size(model):
        candidates[ROTATED] = plan
    model.to(device)
    reference = [model(input_ids=w.to(device)).logits.float().cpu() for w in check.split(2)]
    model.to("cpu")
    scores: dict[str, float] = {}
    blocks = len(model.get_submodule(arch_of(model.config.model_type).blocks))

    def report(done: int, label: str) -> Callable[..., None] | None:
        def layerwise(_stage: int, _label: str, block: int, total: int, _note: str = "") -> None:
            if total == blocks:  # the trial's GPTQ pass (its embedding stage counts one module)
                progress(done * blocks + block, len(candidates) * blocks,
                         f"trial {done + 1}/{len(candidates)}: {label}")
        return layerwise if progress else None

    for done, (label, candidate) in enumerate(candidates.items()):
        trial = copy.deepcopy(model)
        compress(trial, Recipe.from_list(candidate_stages(label, candidate, embedding), where="planned recipe (trial)"),
                 samples[:split], device=device, progress=report(done, label))
        if ROTATED in candidates and label == "planned":  # what the rotated plan may store at most
            allowed = max(stored_bytes(trial, lossless), target_bpw * count_params(model) / 8)
        fits = label != ROTATED or stored_bytes(trial, lossless) <= allowed  # (its codes may code larger)
        if fits:
            trial.to(device)
            kls = [kl_to_teacher(r, trial(input_ids=w.to(device)).logits.float().cpu()) * w.shape[0]
                   for r, w in zip(reference, check.split(2))]
            scores[label] = float(sum(kls)) / check.shape[0]
        del trial
    best = min(scores, key=lambda label: (scores[label], label != "planned"))
    return candidates[best], scores, candidates
