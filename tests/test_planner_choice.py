"""The planner never loses to a uniform recipe of the same size: the candidates fit the target's
file, and a plan worse than a uniform one is replaced by it."""

from __future__ import annotations

import torch

from hypercompress.planning import choice as planner_choice
from hypercompress.planning.mixed_bits import MixedBitsPlanner, Plan, plan_bits
from hypercompress.planning.size_table import SizeTable

from conftest import rtn_trial_bpw, tied_llama

EMBEDDING = "model.embed_tokens"


def samples(n=6, length=32, vocab=200):
    return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def uniforms(model, target: float) -> list[Plan]:
    planner = MixedBitsPlanner(model, samples()[:1], 32, EMBEDDING)
    return planner_choice.uniform_plans(planner, SizeTable(model, planner.candidates, None), target)


def test_uniform_candidates_are_the_largest_that_fit_the_file():
    model = tied_llama(256)
    planner = MixedBitsPlanner(model, samples()[:1], 32, EMBEDDING)
    plans = planner_choice.uniform_plans(planner, SizeTable(model, planner.candidates, None), 5.0)
    assert 1 <= len(plans) <= planner_choice.UNIFORM_KEPT
    for plan in plans:
        assert rtn_trial_bpw(model, plan, EMBEDDING, None) <= 5.0
        assert len({o for n, o in plan.allocation.items() if n != EMBEDDING}) == 1  # one option for every linear
    first = {o for n, o in plans[0].allocation.items() if n != EMBEDDING}.pop()
    assert first == (4, 32)  # the largest linear option below 8 bits that fits beside some embedding


def test_a_plan_worse_than_a_uniform_recipe_is_replaced(monkeypatch):
    model = tied_llama(256)
    good = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    names = list(good.allocation)
    # a plan of the same size that spends its bits badly: the embedding at 8 bits, every linear at 2
    bad = Plan({n: ((8, -1) if n == EMBEDDING else (2, -1)) for n in names}, {}, good.planned_bits, good.params)
    chosen, scores, _ = planner_choice.choose(model, bad, uniforms(model, 5.0), 5.0, samples(), EMBEDDING, None)
    assert chosen is not bad and len(scores) >= 2
    assert scores["planned"] > min(scores.values())
    kept = min(scores, key=scores.get)
    assert kept.startswith("uniform") and rtn_trial_bpw(model, chosen, EMBEDDING, None) <= 5.0


def test_the_plan_is_kept_when_nothing_beats_it():
    model = tied_llama(256)
    plan = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    chosen, scores, _ = planner_choice.choose(model, plan, uniforms(model, 5.0), 5.0, samples(), EMBEDDING, None)
    assert (chosen is plan) == (scores["planned"] <= min(scores.values()))


def test_plans_do_not_depend_on_the_machine_s_fastest_dtype(monkeypatch):
    """Sensitivities in float32 whatever the machine multiplies fastest (bf16 made plans differ)."""
    from hypercompress.planning import sensitivity

    model = tied_llama(256)
    reference = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    monkeypatch.setattr(sensitivity, "fastest_dtype", lambda device="cpu": torch.bfloat16)
    again = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    assert again.allocation == reference.allocation and again.sensitivity == reference.sensitivity


def test_an_untied_model_s_plan_is_also_tried_rotated_at_the_same_size(monkeypatch):
    """The rotated plan is a candidate on an untied RMSNorm model (same modules, same options); when it
    scores best, the planned recipe starts with `rotate` and its file stays within the target."""
    from conftest import make_model
    from hypercompress.storage.artifact import stored_bytes
    from hypercompress.planning.target import planned_recipe
    from hypercompress.modules import count_params
    from hypercompress.planning.target import PlanTarget

    model = make_model("llama")  # untied lm_head
    assert planner_choice.rotation_keeps_size(model) and not planner_choice.rotation_keeps_size(tied_llama(256))
    plan = plan_bits(model, 5.0, samples(vocab=128)[:1, :16], group=32, embedding=EMBEDDING)
    _, scores, candidates = planner_choice.choose(model, plan, [], 5.0, samples(vocab=128), EMBEDDING, None)
    assert planner_choice.ROTATED in scores and candidates[planner_choice.ROTATED] is plan
    assert planner_choice.candidate_stages(planner_choice.ROTATED, plan, EMBEDDING)[0] == {"method": "rotate"}

    real_choose = planner_choice.choose

    def rotated_wins(*args, **kwargs):  # whichever scores lowest is kept: make it the rotated plan
        chosen, scores, candidates = real_choose(*args, **kwargs)
        return chosen, {k: (0.0 if k == planner_choice.ROTATED else v + 1) for k, v in scores.items()}, candidates

    monkeypatch.setattr(planner_choice, "choose", rotated_wins)
    recipe, allocation = planned_recipe(model, PlanTarget(5.0, group_size=32), samples(vocab=128), 0, None)
    stages = recipe.to_list()
    assert stages[0]["method"] == "rotate" and allocation["notes"][-1] == f"kept: {planner_choice.ROTATED}"
    from hypercompress.apply import apply_recipe
    compressed = make_model("llama")
    apply_recipe(compressed, recipe, samples(vocab=128))
    assert stored_bytes(compressed) * 8 <= 5.0 * 1.02 * count_params(make_model("llama"))


def test_a_tied_model_is_not_tried_rotated():
    model = tied_llama(256)
    plan = plan_bits(model, 5.0, samples()[:1], group=32, embedding=EMBEDDING)
    _, scores, _ = planner_choice.choose(model, plan, uniforms(model, 5.0), 5.0, samples(), EMBEDDING, None)
    assert planner_choice.ROTATED not in scores


def test_a_distill_plan_leaves_qat_s_codes_room_under_the_target():
    """qat's trained codes code larger than GPTQ's (planner.QAT_CODE_GROWTH): with --distill the
    plan (every candidate, the kept one too) is fit to target / QAT_CODE_GROWTH, without it to the target."""
    from hypercompress.apply import apply_recipe
    from hypercompress.storage.artifact import stored_bytes
    from hypercompress.planning.target import planned_recipe
    from hypercompress.modules import count_params
    from hypercompress.planning.mixed_bits import QAT_CODE_GROWTH
    from hypercompress.recipe import Recipe
    from hypercompress.planning.target import PlanTarget

    def stored(distill_steps: int) -> tuple[float, list]:
        recipe, _ = planned_recipe(tied_llama(256), PlanTarget(5.0, group_size=32), samples(), distill_steps, None)
        stages = recipe.to_list()
        codes = [s for s in stages if s["method"] != "qat"]
        model = tied_llama(256)
        apply_recipe(model, Recipe.from_list(codes), samples())
        return stored_bytes(model) * 8 / count_params(tied_llama(256)), stages

    plain, plain_stages = stored(0)
    room, room_stages = stored(3)
    assert [s["method"] for s in room_stages][-1] == "qat" and "qat" not in [s["method"] for s in plain_stages]
    assert 5.0 / QAT_CODE_GROWTH < plain <= 5.0
    assert room <= 5.0 / QAT_CODE_GROWTH
