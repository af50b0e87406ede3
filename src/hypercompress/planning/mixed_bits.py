"""Budget planner: mixed bit-widths and group sizes across modules to hit a whole-model bpw target.

1. Sensitivity (measured, not guessed: sensitivity.py): per module and option, the KL of the model
   with only that module round-to-nearest quantized.
2. Allocation: for several floors on the bits allowed (linears and embedding at >= 2, 3, 4), a
   multiple-choice knapsack (one option per module, least summed KL within the budget) solved by
   dynamic programming over the budget's slack (allocate). Costs are exact storage bits of the
   compressed modules (empty modules measured, not formulas). Offering group sizes as well as
   bit-widths lets a 3.0 bpw plan keep 3-bit codes with fewer scales instead of forcing whole
   modules down to 2 bits, where errors compound far beyond the sum of single-module KLs. Because
   of that compounding, each candidate plan's KL is then measured jointly (all modules quantized at
   once, one forward) and the lowest wins.
3. The result is an ordinary recipe: an RTN stage for the embedding (tied heads follow it), then one
   GPTQ stage per option naming its modules, so the plan is saved, shown and reproducible.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..arch import block_linear_names
from ..errors import UserError
from ..layers import QuantEmbedding, QuantLinear
from ..layers.quant_linear import resolve_group_size
from ..layers.base import Conv1D, linear_weight
from ..modules import count_params
from .sensitivity import Option, TailRunner, block_modules, joint_kl, measure_sensitivity

CELLS_PER_MODULE = 128    # resolution of the knapsack over the slack (allocate)


def linear_options(group: int = 64) -> tuple[Option, ...]:
    """Candidate (bits, group) options of a block linear."""
    return ((2, -1), (2, group), (3, -1), (3, group), (4, -1), (4, group), (8, -1))


def embedding_options(group: int = 64) -> tuple[Option, ...]:
    """Candidate options of the token embedding (and a tied lm_head): never below 2 bits per row."""
    return ((2, -1), (3, -1), (3, group), (4, -1), (4, group), (6, -1), (8, -1))


def option_label(option: Option) -> str:
    bits, group = option
    return f"w{bits}{'row' if group == -1 else f'g{group}'}"


@dataclass
class Plan:
    allocation: dict[str, Option]       # module name -> (bits, group)
    sensitivity: dict[str, dict[Option, float]]
    planned_bits: int                   # tensor bits of the whole planned model
    params: int
    joint_kl: float = float("nan")      # measured KL of the chosen plan (all modules RTN at once)
    candidates: dict[str, float] | None = None  # measured joint KL of each candidate plan
    predicted_bytes: int | None = None  # model.safetensors of its RTN codes, from the size table

    @property
    def bits_per_weight(self) -> float:
        return self.planned_bits / self.params


def fits_module(width: int, option: Option) -> bool:
    """Whether `option`'s group size divides a module's input width (rows always do)."""
    return option[1] == -1 or width % option[1] == 0


def quant_bits(module: nn.Module, option: Option, name: str = "module") -> int:
    """Exact storage bits of `module` quantized with `option` (an empty module of that layout,
    measured). UserError when the option's group does not divide the module's input width."""
    weight = module.weight
    out_f, in_f = (weight.shape[1], weight.shape[0]) if Conv1D and isinstance(module, Conv1D) else weight.shape
    bias = getattr(module, "bias", None) is not None
    kind = QuantEmbedding if isinstance(module, nn.Embedding) else QuantLinear
    bits, group = option
    return kind(in_f, out_f, bits, resolve_group_size(name, in_f, group), False, "int", bias).storage_bits()


def allocate(costs: dict[str, dict[Any, int]], loss: dict[str, dict[Any, float]],
             budget_bits: int) -> dict[str, Any]:
    """Multiple-choice knapsack: one option per module, total cost <= budget_bits, least summed loss.

    costs[name][option] are storage bits, loss[name][option] the measured KL. Solved by dynamic
    programming over the bits above every module's cheapest option, in cells of slack / CELLS_PER_MODULE
    per module with costs rounded up (so the plan always fits; at most one cell per module unused).
    Exact up to that rounding: a greedy walk along each module's convex hull strands slack where one
    large module (an embedding) steps coarsely, and the sizes it reaches then have gaps a plan fills.
    Over budget even at the cheapest options: the cheapest options.
    """
    names = list(costs)
    options = {n: sorted(costs[n], key=lambda o, n=n: (costs[n][o], loss[n][o])) for n in names}
    base = {n: costs[n][options[n][0]] for n in names}
    slack = budget_bits - sum(base.values())
    if slack <= 0:
        return {n: options[n][0] for n in names}
    cells = CELLS_PER_MODULE * len(names)
    best = np.zeros(cells + 1)  # best[c]: least loss of the modules so far within c cells
    choices = []
    for n in names:
        table = np.full((len(options[n]), cells + 1), np.inf)
        for k, o in enumerate(options[n]):
            width = -(-(costs[n][o] - base[n]) * cells // slack)  # ceil in integers: exact
            if width <= cells:
                table[k, width:] = best[:cells + 1 - width] + loss[n][o]
        choices.append(table.argmin(0))  # ties: the cheaper option
        best = table.min(0)
    choice, cell = {}, cells
    for n, picks in zip(reversed(names), reversed(choices)):
        o = options[n][picks[cell]]
        choice[n] = o
        cell -= -(-(costs[n][o] - base[n]) * cells // slack)
    return {n: choice[n] for n in names}


def candidate_options(model: nn.Module, group: int, embedding: str | None = None
                      ) -> tuple[dict[str, tuple[Option, ...]], str, dict[str, dict[Option, int]], int]:
    """(options per module: every block linear and the embedding, each option's group dividing the
    module's input width; the embedding's name; exact storage bits per module and option; bits of
    everything the planner does not touch). UserError when `group` divides no block linear's width."""
    from ..storage.artifact import storage_bits

    embed_name = embedding or next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    offered = {n: linear_options(group) for n in block_linear_names(model)}
    offered[embed_name] = embedding_options(group)
    modules = {n: model.get_submodule(n) for n in offered}
    widths = sorted({linear_weight(modules[n]).shape[1] for n in offered if n != embed_name})
    if widths and all(w % group for w in widths):
        common = [d for d in (32, 64, 96, 128, 192, 256) if all(w % d == 0 for w in widths)]
        raise UserError(f"group_size={group} divides none of the block linears' input widths "
                        f"({', '.join(map(str, widths))}); use one that does, e.g. "
                        f"{', '.join(map(str, common)) or min(widths)}")
    candidates = {n: tuple(o for o in opts if fits_module(linear_weight(modules[n]).shape[1], o))
                  for n, opts in offered.items()}
    dense = {n: sum(t.numel() * 16 for t in m.state_dict().values()) for n, m in modules.items()}
    costs = {n: {o: quant_bits(modules[n], o, n) for o in candidates[n]} for n in candidates}
    return candidates, embed_name, costs, storage_bits(model) - sum(dense.values())


def floor_bpw(model: nn.Module, group: int = 64) -> float:
    """The smallest whole-model bpw a quantization plan reaches (every module at its fewest bits)."""
    _, _, costs, fixed = candidate_options(model, group)
    return (fixed + sum(min(c.values()) for c in costs.values())) / count_params(model)


class MixedBitsPlanner:
    """Plans of one model for any budget: options and exact costs counted once, sensitivities
    measured once (or given), each candidate allocation's joint KL measured once (memoized), so
    re-planning for another budget (fitting the plan to its file) costs only the new drafts' KLs.

    Sensitivities are measured on a copy of the model in `dtype` (default float32, so that every
    machine makes the same plan: bfloat16 is 2.6x faster on CPUs with native bf16, but a plan made
    with it differed between two machines; pass fastest_dtype() to trade that away), on `device`
    (a GPU sums float32 in another order than a CPU, so the two can differ where two options' KLs
    tie to rounding; every CPU, and every GPU, gives the same plan); `samples` (N, T) token ids.
    progress(done, total) as sensitivities are measured, then progress(done, total, "joint") as the
    candidate plans' whole-model KLs are. `release()` frees the probe copy once planning is done.
    """

    def __init__(self, model: nn.Module, samples: torch.Tensor, group: int = 64, embedding: str | None = None,
                 progress: Callable[..., None] | None = None, dtype: torch.dtype | None = None,
                 sensitivity: dict[str, dict[Option, float]] | None = None, device: str = "cpu"):
        self.params = count_params(model)
        self.candidates, self.embedding, self.costs, self.fixed = candidate_options(model, group, embedding)
        self.model, self.samples, self.group, self.progress = model, samples, group, progress
        self.dtype, self.device, self.sensitivity = dtype or torch.float32, device, sensitivity
        self.runner: TailRunner | None = None
        self.joint: dict[tuple, float] = {}  # sorted allocation items -> measured joint KL

    @property
    def floor_bits(self) -> int:
        """Tensor bits of the smallest plan (every module at its cheapest option), all included."""
        return self.fixed + sum(min(c.values()) for c in self.costs.values())

    @property
    def ceiling_bits(self) -> int:
        """Tensor bits of the largest plan."""
        return self.fixed + sum(max(c.values()) for c in self.costs.values())

    def _probe(self) -> TailRunner:
        if self.runner is None:
            probe = copy.deepcopy(self.model).to(self.device, self.dtype)
            self.runner = TailRunner(probe, self.samples.to(self.device), 4,
                                     observe=block_modules(probe, self.candidates))
        if self.sensitivity is None:
            self.sensitivity = measure_sensitivity(self.runner.model, self.candidates, self.runner.samples,
                                                   progress=self.progress, runner=self.runner)
        return self.runner

    def release(self) -> None:
        """Free the probe (a float32 copy of the model and its cached block inputs)."""
        self.runner = None

    def draft(self, target_bpw: float, floors: tuple[int, int]) -> Plan | None:
        """The knapsack's allocation within `target_bpw` x params tensor bits among the options of at
        least `floors` = (bits of the block linears, bits of the embedding) (FLOORS); None when even
        those options' cheapest do not fit. Its joint KL is not measured (`measure`)."""
        budget = int(target_bpw * self.params) - self.fixed
        allowed = self._allowed(floors)
        if any(not c for c in allowed.values()) or sum(min(c.values()) for c in allowed.values()) > budget:
            return None
        self._probe()
        allocation = allocate(allowed, self.sensitivity, budget)
        planned = self.fixed + sum(self.costs[n][o] for n, o in allocation.items())
        return Plan(allocation, self.sensitivity, planned, self.params)

    def family_floor_bits(self, floors: tuple[int, int]) -> int | None:
        """Tensor bits of the smallest plan of the family `floors` (None: no option of some module
        is allowed)."""
        allowed = self._allowed(floors)
        return None if not all(allowed.values()) else self.fixed + sum(min(c.values()) for c in allowed.values())

    def _allowed(self, floors: tuple[int, int]) -> dict[str, dict[Option, int]]:
        """Each module's options (and costs) of at least `floors` = (linears' bits, embedding's bits)."""
        linear_floor, embed_floor = floors
        return {n: {o: c for o, c in self.costs[n].items()
                    if o[0] >= (embed_floor if n == self.embedding else linear_floor)} for n in self.costs}

    def measure(self, allocation: dict[str, Option]) -> float:
        """The joint KL of `allocation` (every module RTN-quantized at once, on the probe window),
        memoized."""
        key = tuple(sorted(allocation.items()))
        if key not in self.joint:
            runner = self._probe()
            self.joint[key] = joint_kl(runner.model, runner, allocation)
        return self.joint[key]

    def plan(self, target_bpw: float) -> Plan:
        """The plan of least measured joint KL whose tensor bits fit `target_bpw` x params.
        UserError when even every module at its cheapest option does not fit."""
        budget = int(target_bpw * self.params) - self.fixed
        if budget < self.floor_bits - self.fixed:
            raise UserError(f"--target-bpw {target_bpw}: the smallest plan (every module at its fewest "
                            f"bits: 2-bit codes, one scale per row) is "
                            f"{self.floor_bits / self.params:.3f} bpw; ask for at least that")
        # Single-module KLs add up only while errors are small: many modules at 2 bits compound far
        # beyond the sum. So plans are built with the fewest bits allowed at 2, 3 and 4 (linears) and
        # 2, 3, 4 (embedding), and the one whose *measured* whole-plan KL is lowest wins.
        drafts: list[tuple[dict[str, Option], tuple[int, int]]] = []
        for floors in FLOORS:
            draft = self.draft(target_bpw, floors)
            if draft is not None and all(draft.allocation != d[0] for d in drafts):
                drafts.append((draft.allocation, floors))
        if not drafts:  # only the unrestricted options fit
            self._probe()
            drafts.append((allocate(self.costs, self.sensitivity, budget), (2, 2)))
        plans = []
        for done, (allocation, floors) in enumerate(drafts):
            plans.append((self.measure(allocation), allocation, floors))
            if self.progress:
                self.progress(done + 1, len(drafts), "joint")
        measured, allocation, floors = min(plans, key=lambda p: p[0])
        planned = self.fixed + sum(self.costs[n][o] for n, o in allocation.items())
        return Plan(allocation, self.sensitivity, planned, self.params, measured,
                    {family_label(f): kl for kl, _, f in plans})


FLOORS: tuple[tuple[int, int], ...] = tuple(itertools.product((2, 3, 4), (2, 3, 4)))
"""The families of plans: (fewest bits of a block linear, fewest bits of the embedding)."""


def family_label(floors: tuple[int, int]) -> str:
    return f"linears>={floors[0]},embedding>={floors[1]}"


def plan_bits(model: nn.Module, target_bpw: float, samples: torch.Tensor, group: int = 64,
              embedding: str | None = None,
              progress: Callable[..., None] | None = None,
              dtype: torch.dtype | None = None,
              sensitivity: dict[str, dict[Option, float]] | None = None, device: str = "cpu") -> Plan:
    """Plan a (bits, group) option per module for a whole-model target (all stored bits / params):
    MixedBitsPlanner(...).plan(target_bpw), the probe released afterwards (see there for the
    arguments; `sensitivity`: an earlier plan's, re-planning the same model for another target)."""
    planner = MixedBitsPlanner(model, samples, group, embedding, progress, dtype, sensitivity, device)
    try:
        return planner.plan(target_bpw)
    finally:
        planner.release()


def plan_recipe(plan: Plan, embedding: str) -> list[dict[str, Any]]:
    """The plan as recipe stages: RTN for the embedding, one GPTQ stage per linear option."""
    bits, group = plan.allocation[embedding]
    stages: list[dict[str, Any]] = [{"method": "rtn", "bits": bits, "group_size": group,
                                     "targets": [f"^{re.escape(embedding)}$"]}]
    for option in sorted({o for n, o in plan.allocation.items() if n != embedding}):
        names = sorted(n for n, o in plan.allocation.items() if o == option and n != embedding)
        stages.append({"method": "gptq", "bits": option[0], "group_size": option[1], "act_order": True,
                       "targets": [f"^{re.escape(n)}$" for n in names]})
    return stages


QAT_CODE_GROWTH = 1.035
"""How much larger the lossless-coded file of trained (qat) codes is than the GPTQ codes it started
from, at most: LSQ-learned steps spread the code histogram, so zstd codes it less tightly. Measured
on SmolLM2-135M (benchmarks/RESULTS.md, quality frontier): +1.6% to +3.3% over six runs at 2.3-4.0 bpw.
A plan with a qat stage is fit to target / QAT_CODE_GROWTH so its trained file lands at or under the target."""


def qat_stage(steps: int) -> dict[str, Any]:
    """The recovery stage of the quantization route (--distill): `qat` over the planned codes (each
    module keeps its bits and group), Block-AP then `steps` end-to-end steps of 8 windows."""
    return {"method": "qat", "steps": steps, "batch": 8}
