"""The GPTQ trials of the planner's choice (choice.py): candidates compressed for scoring.

`shared_gptq` runs the original model once over the trial windows, block by block on `device`,
taking each block linear's Hessian H = 2/n X^T X from its inputs (linears fed the same tensor share
one product, as GPTQ's own pass does), and solves every wanted (module, option) once against it;
`trial_model` assembles a candidate from those solutions and its RTN embedding. The rotated
candidate changes the weights and their inputs, so it is compressed on its own (`rotated_trial`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..arch import arch_of
from ..block_calls import capture_block_inputs
from ..experts import ExpertLinears, routed_calibration
from ..layers.quant_linear import QuantLinear
from ..modules import replace_module
from .mixed_bits import Plan, plan_recipe
from .sensitivity import Option


@torch.no_grad()
def shared_gptq(model: nn.Module, wanted: set[tuple[str, Option]], samples: torch.Tensor, device: str = "cpu",
                batch: int = 8, progress: Callable[[int], None] | None = None
                ) -> dict[tuple[str, Option], QuantLinear]:
    """{(module, option): its GPTQ QuantLinear (act_order, damp 0.01, as the planned stages run)}
    for every wanted pair of block linears, against Hessians of the original model's inputs on
    `samples` (N, T) token ids, `batch` windows per forward; the linears fed one input and all their
    options are solved in one pass (gptq_modules_shared). Only the block at hand sits on
    `device`; the model is left as it was (on the CPU). progress(blocks done) after each block."""
    from ..methods.gptq import GPTQ, GptqConfig, gptq_modules_shared, same_hessian, shared_inputs

    blocks = model.get_submodule(arch_of(model.config.model_type).blocks)
    prefix = f"{arch_of(model.config.model_type).blocks}."
    options: dict[str, list[Option]] = {}
    for name, option in sorted(wanted):
        options.setdefault(name, []).append(option)
    hiddens, calls = capture_block_inputs(model, samples, batch)
    calls = calls.to(device)
    hiddens = [h.to(device) for h in hiddens]
    solved: dict[tuple[str, Option], QuantLinear] = {}
    for index, block in enumerate(blocks):
        names = [n for n in options if n.startswith(f"{prefix}{index}.")]
        block.to(device)
        grams = GPTQ(GptqConfig())  # its Hessian accumulation (observe, hessian), as the final pass takes it
        handles = [model.get_submodule(n).register_forward_hook(
            lambda _m, args, _out, name=n: grams.observe(name, args[0])) for n in names]
        experts = {n: m for n, m in block.named_modules() if isinstance(m, ExpertLinears)} if names else {}
        try:
            with routed_calibration(experts):  # experts routed too few tokens get more (experts.py)
                hiddens = [calls.run(block, index, b, h) for b, h in enumerate(hiddens)]  # the next block's inputs
        finally:
            for handle in handles:
                handle.remove()
        # linears fed one input share one Hessian: solved together
        for hessian, group in shared_inputs([(grams.hessian(n), n) for n in names], same_hessian):
            entries = [(n, model.get_submodule(n), bits, size) for n in group for bits, size in options[n]]
            for (name, _layer, bits, size), module in zip(entries, gptq_modules_shared(entries, hessian, GptqConfig())):
                solved[(name, (bits, size))] = module
        block.to("cpu")
        if progress:
            progress(index + 1)
    return solved


def trial_model(model: nn.Module, plan: Plan, embedding: str, solved: dict[tuple[str, Option], QuantLinear]
                ) -> nn.Module:
    """A copy of `model` compressed as `plan`: its embedding by the plan's RTN stage, every block
    linear by its solved GPTQ module (shared with other trials: read, never changed)."""
    from ..apply import apply_recipe
    from ..recipe import Recipe

    trial = copy.deepcopy(model)
    apply_recipe(trial, Recipe.from_list(plan_recipe(plan, embedding)[:1], where="planned recipe (trial)"))
    for name, option in plan.allocation.items():
        if name != embedding:
            replace_module(trial, name, solved[(name, option)])
    return trial


def rotated_trial(model: nn.Module, stages: list[dict], samples: torch.Tensor, device: str = "cpu") -> nn.Module:
    """A copy of `model` compressed by `stages` (rotate first) on `samples`, as the final run would."""
    from ..apply import apply_recipe
    from ..recipe import Recipe

    trial = copy.deepcopy(model)
    apply_recipe(trial, Recipe.from_list(stages, where="planned recipe (trial)"), samples, device=device)
    return trial
