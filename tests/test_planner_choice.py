"""The planner never loses to a uniform recipe of the same size: the candidates fit the target's
file, and a plan worse than a uniform one is replaced by it."""

from __future__ import annotations

import torch

from hypercompress import planner_choice
from hypercompress.planner import Plan, plan_bits
from hypercompress.planner_fit import stored_bpw

from conftest import tied_llama

EMBEDDING = "model.embed_tokens"


def samples(n=6, length=32):
    return torch.randint(1, 200, (n, length), generator=torch.Generator().manual_seed(0))


def test_uniform_candidates_are_the_largest_that_fit_the_file():
    model = tied_llama(256)
    plans = planner_choice.uniform_plans(model, 5.0, 32, EMBEDDING, None, coding_ratio=1.0)
    assert 1 <= len(plans) <= planner_choice.UNIFORM_KEPT
    for plan in plans:
        assert stored_bpw(model, plan, EMBEDDING, None) <= 5.0
        assert len({o for n, o in plan.allocation.items() if n != EMBEDDING}) == 1  # one option for every linear
    first = {o for n, o in plans[0].allocation.items() if n != EMBEDDING}.pop()
    assert first == (4, 32)  # the largest linear option below 8 bits that fits beside some embedding


def test_a_plan_worse_than_a_uniform_recipe_is_replaced(monkeypatch):
    model = tied_llama(256)
    good = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    names = list(good.allocation)
    # a plan of the same size that spends its bits badly: the embedding at 8 bits, every linear at 2
    bad = Plan({n: ((8, -1) if n == EMBEDDING else (2, -1)) for n in names}, {}, good.planned_bits, good.params)
    chosen, scores, _ = planner_choice.choose(model, bad, 5.0, samples(), 32, EMBEDDING, None)
    assert chosen is not bad and len(scores) >= 2
    assert scores["planned"] > min(scores.values())
    kept = min(scores, key=scores.get)
    assert kept.startswith("uniform") and stored_bpw(model, chosen, EMBEDDING, None) <= 5.0


def test_the_plan_is_kept_when_nothing_beats_it():
    model = tied_llama(256)
    plan = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    chosen, scores, _ = planner_choice.choose(model, plan, 5.0, samples(), 32, EMBEDDING, None)
    assert (chosen is plan) == (scores["planned"] <= min(scores.values()))


def test_plans_do_not_depend_on_the_machine_s_fastest_dtype(monkeypatch):
    """Sensitivities in float32 whatever the machine multiplies fastest (bf16 made plans differ)."""
    from hypercompress import planner

    model = tied_llama(256)
    reference = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    monkeypatch.setattr(planner, "fastest_dtype", lambda device="cpu": torch.bfloat16)
    again = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    assert again.allocation == reference.allocation and again.sensitivity == reference.sensitivity
