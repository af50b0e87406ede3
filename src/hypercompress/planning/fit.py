"""Fitting a budget plan to the file it writes: land a size target within a tolerance, or refuse it.

The planner (mixed_bits.py) counts tensor bits; the artifact's file also holds the safetensors header
and, with the lossless stage, is smaller than its tensors by a ratio that depends on the plan. And the
sizes a plan can reach are discrete: each module takes one of a few options, so on a model whose
storage is dominated by a few large modules (a big embedding) they cluster, with gaps between. The
search below therefore works on the file's size, predicted exactly by the size table (size_table.py:
the bytes RTN codes of the plan store, header and lossless coding included; GPTQ's codes of the same
grid code alike, within the room its `bound_bytes` gives them), and the planning budget (bpw of tensor
bits) is moved until a plan lands in [target x (1 - tolerance), target]; first by the secant step
budget x target / stored, then by bisection of the bracket of budgets whose plans store under and
over the target. When the bracket closes without a hit, the target lies in a gap, and the refusal
names the nearest sizes found on each side, every one of them a size a plan reaches (so a target
there is met). The planner's plans come in families (the fewest bits its linears and its embedding
may take), and the search runs in each family on its own: within one the file grows in fine steps
with the budget, while the planner's pick among families at one budget jumps between their sizes
(SmolLM2-135M at 2.8986 bpw, `--target-bpw 3 --distill`, fell between 2.8356 and 2.9233 that way).
The fitted plans, all of about the target's size, are then compared by their measured joint KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from ..errors import UserError
from .mixed_bits import FLOORS, MixedBitsPlanner, Plan, family_label
from .size_table import SizeTable

SECANT_TRIALS = 3       # trials that may take the secant step; bisection after them
BUDGET_RESOLUTION = 1e-3  # bpw: a bracket of planning budgets this narrow is closed
HEADROOM = 1.005          # a refusal's hint above the target: 0.5% over the smallest size found there


@dataclass
class Trial:
    """A plan and the bits per original weight of the file it writes."""
    plan: Any
    stored: float


def smallest_allocation(planner: MixedBitsPlanner) -> dict:
    """Every planned module at its cheapest option (in tensor bits)."""
    return {n: min(c, key=c.get) for n, c in planner.costs.items()}


def smallest_file_fits(planner: MixedBitsPlanner, table: SizeTable, target_bpw: float) -> bool:
    """Whether the plan of every module at its fewest bits writes a file of at most `target_bpw`
    (its size table's bound: header, lossless stage and GPTQ's room counted)."""
    return table.bound_bits_per_weight(smallest_allocation(planner)) <= target_bpw


def fit_plan_to_file(planner: MixedBitsPlanner, table: SizeTable, target_bpw: float, tolerance: float = 0.02,
                     trials: int = 14, progress: Callable[[int, int, str], None] | None = None,
                     hint_scale: float = 1.0) -> Plan:
    """The plan of least measured joint KL among those whose files, as the size table bounds them
    (`bound_bytes`: RTN's bytes plus the room left for GPTQ's codes), store between target_bpw x
    (1 - tolerance) and target_bpw bits per weight; its `predicted_bytes` is the table's (RTN)
    prediction, `candidates` the joint KL of each family's fitted plan.

    Each family of plans (mixed_bits.FLOORS: the fewest bits the linears and the embedding may take)
    is fit on its own, by the search of the module docstring over its planning budget: within a
    family the file grows in fine steps with the budget, while the planner's pick among families at
    one budget (by joint KL) jumps between their sizes, leaving gaps no budget lands in. Families
    whose plans cannot land are skipped. progress(families searched, families, "k plans sized") after
    each plan sized and each family. Raises UserError
    naming the sizes reached nearest the target over every family when none lands, and the targets
    to ask for instead: those sizes x `hint_scale` (the caller's target is `target_bpw` x hint_scale).
    """
    params = planner.params
    families = [(f, bits) for f in FLOORS if (bits := planner.family_floor_bits(f)) is not None]
    searched, sized = [0], [0]
    landed: dict[tuple, tuple[tuple[int, int], Plan]] = {}
    under: Trial | None = None
    over: Trial | None = None

    def stored(candidate: Plan) -> float:
        candidate.predicted_bytes = table.file_bytes(candidate.allocation)
        sized[0] += 1
        if progress:
            progress(searched[0], len(families), f"{sized[0]} plans sized")
        return table.bound_bits_per_weight(candidate.allocation)

    for floors, floor_bits in families:
        smallest = floor_bits / params

        def replan(budget: float, floors=floors, smallest=smallest) -> Plan | None:
            # a budget under the family's tensor-bit floor: its smallest plan (its coded file may fit)
            return planner.draft(max(budget, smallest), floors)

        try:
            plan = fit_budget(replan, stored, lambda p: p.bits_per_weight, _key, target_bpw,
                              (smallest, planner.ceiling_bits / params), tolerance, trials)
        except Unreached as missed:
            under = _nearer(under, missed.under, lambda t: t.stored)
            over = _nearer(over, missed.over, lambda t: -t.stored)
        else:
            landed.setdefault(_key(plan), (floors, plan))
        searched[0] += 1
        if progress:
            progress(searched[0], len(families), f"{sized[0]} plans sized")
    if not landed:
        raise UserError(unreachable_message(target_bpw, tolerance, under, over, hint_scale))
    scores = {}
    for index, (floors, plan) in enumerate(landed.values()):
        scores[family_label(floors)] = planner.measure(plan.allocation)
        if planner.progress:
            planner.progress(index + 1, len(landed), "joint")
    floors, best = min(landed.values(), key=lambda fp: (scores[family_label(fp[0])], fp[1].planned_bits))
    best.joint_kl, best.candidates = scores[family_label(floors)], scores
    return best


def _key(plan: Plan) -> Hashable:
    return tuple(sorted(plan.allocation.items()))


def _nearer(kept: Trial | None, found: Trial | None, rank: Callable[[Trial], float]) -> Trial | None:
    """Of two trials (either may be None), the one of larger `rank`."""
    if kept is None or (found is not None and rank(found) > rank(kept)):
        return found
    return kept


class Unreached(UserError):
    """No plan of a search landed: `under` stores the most under the target, `over` the least over
    it (either None when none was found on that side)."""

    def __init__(self, message: str, under: Trial | None, over: Trial | None):
        super().__init__(message)
        self.under, self.over = under, over


def fit_budget(replan: Callable[[float], Any], stored: Callable[[Any], float], planned: Callable[[Any], float],
               key: Callable[[Any], Hashable], target_bpw: float, bounds: tuple[float, float],
               tolerance: float = 0.02, trials: int = 14, under: Trial | None = None,
               progress: Callable[[int, int], None] | None = None, hint_scale: float = 1.0) -> Any:
    """The search of the module docstring, for any planner: `replan(budget)` gives the plan for a
    planning budget in bpw (None: no plan that small), `stored(plan)` its file's bpw, `planned(plan)`
    its planned bpw, `key(plan)` an identity (a plan met again is not measured again); `bounds` the
    budgets of the smallest and largest plans; `under` a trial already known to store under the
    target (the smallest plan); progress(attempt, trials) after each attempt. Returns the first plan whose file lands within
    [target x (1 - tolerance), target]; else raises UserError naming the sizes found nearest it."""
    low = target_bpw * (1 - tolerance)
    # the trial storing the most at or under the target
    over: Trial | None = None   # the trial storing the least over it
    bracket = list(bounds)  # planning budgets: the low end's plan stores under, the high end's over
    budget, seen = target_bpw, {}
    for attempt in range(trials):
        plan = replan(budget)
        if plan is None:  # below the smallest plan
            bracket[0] = max(bracket[0], budget)
            guess = None
        else:
            if key(plan) not in seen:
                seen[key(plan)] = Trial(plan, stored(plan))
            trial = seen[key(plan)]
            if progress:
                progress(attempt + 1, trials)
            if low <= trial.stored <= target_bpw:
                return trial.plan
            if trial.stored <= target_bpw:
                under = trial if under is None or trial.stored > under.stored else under
                bracket[0] = max(bracket[0], budget)
                if planned(plan) >= bounds[1]:
                    break  # every module at its largest option already
            else:
                over = trial if over is None or trial.stored < over.stored else over
                bracket[1] = min(bracket[1], budget)
                if planned(plan) <= bounds[0]:
                    break  # every module at its smallest option already
            guess = planned(trial.plan) * target_bpw / trial.stored  # the file's size ~ proportional to tensor bits
        if bracket[1] - bracket[0] < BUDGET_RESOLUTION:
            break  # the target lies between two neighbouring plans
        inside = guess is not None and bracket[0] < guess < bracket[1]
        budget = guess if attempt < SECANT_TRIALS and inside else (bracket[0] + bracket[1]) / 2
    raise Unreached(unreachable_message(target_bpw, tolerance, under, over, hint_scale), under, over)


def _size(bpw: float) -> str:
    if bpw < 1e-3:  # a target far past any plan (1e-300 bpw): no 300-digit ratio
        return f"{bpw:.4g} bpw ({16 / bpw:.4g}x)"
    return f"{bpw:.4f} bpw ({16 / bpw:.2f}x)"


def _ask(stored: float, bound: str = "", headroom: float = 1.0) -> str:
    """A target that a plan storing `stored` bpw meets: bpw rounded up, ratio rounded down, as a
    bound: "" (that target), "most" or "least" (on the bpw; the ratio's bound is the other one).
    `headroom` > 1 for a plan found just past a jump in the sizes: the search for the target finds
    that side of the jump only if the target leaves it a little room."""
    bpw = math.ceil(stored * headroom * 1000) / 1000
    ratio = math.floor(1600 / bpw) / 100
    if not bound:
        return f"--target-bpw {bpw:.3f} (--target-ratio {ratio:.2f})"
    other = "least" if bound == "most" else "most"
    return f"at {bound} --target-bpw {bpw:.3f} (a --target-ratio of at {other} {ratio:.2f})"


def unreachable_message(target_bpw: float, tolerance: float, under: Trial | None, over: Trial | None,
                        hint_scale: float = 1.0) -> str:
    """The refusal: what the target is, the sizes reached nearest it on each side, what to ask for
    (a size x `hint_scale`: the user's target when the search ran on target / hint_scale)."""
    head = (f"target {_size(target_bpw)}: no plan's file lands within {tolerance:.0%} "
            f"at or under it")
    if under is None:
        return (f"{head}: it is beyond reach, the smallest plan stores {_size(over.stored)}; "
                f"ask for {_ask(over.stored * hint_scale, 'least', HEADROOM)}" if over
                else f"{head}; ask for a larger target")
    if over is None:
        return (f"{head}: it is beyond reach, the largest plan stores {_size(under.stored)}; "
                f"ask for {_ask(under.stored * hint_scale, 'most')}")
    return (f"{head}: the plans nearest it store {_size(under.stored)} and {_size(over.stored)} (the sizes of this "
            f"model's plans step coarsely here); ask for {_ask(under.stored * hint_scale)} or "
            f"{_ask(over.stored * hint_scale, headroom=HEADROOM)}")
