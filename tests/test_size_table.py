"""The size table predicts the model.safetensors a plan writes to the byte: header, untouched
tensors, every planned module's (coded) tensors; no trial compression."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors.torch import save as serialize

from conftest import make_model, make_tokenizer, tied_llama
from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.planning.mixed_bits import Plan, candidate_options, plan_recipe
from hypercompress.planning.size_table import SizeTable, safetensors_file_bytes, stored_tensor
from hypercompress.recipe import Recipe

DTYPES = (torch.float16, torch.float32, torch.bfloat16, torch.uint8, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.float64, torch.bool)


def test_the_header_is_counted_as_safetensors_writes_it():
    rng = random.Random(0)
    for case in range(30):
        tensors = {}
        for i in range(rng.randint(0, 12)):
            name = rng.choice(["model.layers.", "lm_head.", "a.", "model.embed_tokens."]) + f"{rng.randint(0, 999)}.w{i}"
            shape = [rng.randint(0, 40) for _ in range(rng.randint(0, 3))]
            tensors[name] = torch.zeros(shape, dtype=rng.choice(DTYPES))
        predicted = safetensors_file_bytes(stored_tensor(n, t) for n, t in tensors.items())
        assert predicted == len(serialize(tensors, metadata={"format": "pt"})), (case, tensors.keys())


def rtn_stages(plan: Plan, embedding: str) -> list[dict]:
    """The plan's recipe with RTN in place of GPTQ (the codes the table counts)."""
    return [{k: v for k, v in s.items() if k != "act_order"} | {"method": "rtn"} for s in plan_recipe(plan, embedding)]


def random_plans(model, group: int, count: int, seed: int) -> tuple[list[Plan], str]:
    candidates, embedding, costs, fixed = candidate_options(model, group)
    rng = random.Random(seed)
    plans = []
    for _ in range(count):
        allocation = {n: rng.choice(options) for n, options in candidates.items()}
        plans.append(Plan(allocation, {}, fixed + sum(costs[n][o] for n, o in allocation.items()), 1))
    return plans, embedding


@pytest.mark.parametrize("arch", ["tied", "llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("lossless", [None, 10])
def test_the_table_predicts_the_saved_file_exactly(arch, lossless, tmp_path):
    model = tied_llama(256) if arch == "tied" else make_model(arch)
    plans, embedding = random_plans(model, 32, 3, seed=len(arch))
    table = SizeTable(model, plans[0].allocation, lossless)
    for index, plan in enumerate(plans):
        trial = copy.deepcopy(model)
        apply_recipe(trial, Recipe.from_list(rtn_stages(plan, embedding)))
        predicted = table.file_bytes(plan.allocation)
        assert predicted == artifact.stored_bytes(trial, lossless), (index, plan.allocation)
        if index == 0:  # and the bytes stored_bytes counts are the bytes written
            out = artifact.save(trial, make_tokenizer(), tmp_path / "art", recipe=[], original_params=table.params,
                                lossless=lossless)
            assert (out / artifact.WEIGHTS).stat().st_size == predicted


def test_the_table_codes_each_module_option_once():
    model = tied_llama(256)
    plans, _ = random_plans(model, 32, 2, seed=1)
    table = SizeTable(model, plans[0].allocation, 10)
    table.file_bytes(plans[0].allocation)
    entries = dict(table.entries)
    table.file_bytes(plans[0].allocation)
    assert table.entries == entries and len(entries) == len(plans[0].allocation)
    with pytest.raises(KeyError):
        table.file_bytes({n: o for n, o in list(plans[1].allocation.items())[1:]})


def test_the_bound_gives_the_grown_modules_their_options_room():
    from hypercompress.planning.size_table import GPTQ_CODE_GROWTH, code_growth

    model = tied_llama(256)
    plans, embedding = random_plans(model, 32, 2, seed=3)
    allocation = plans[0].allocation
    linears = [n for n in allocation if n != embedding]
    coded = SizeTable(model, allocation, 10, grown=linears)
    exact = coded.file_bytes(allocation)
    room = sum(t.nbytes * (code_growth(allocation[n]) - 1) for n in linears for t in coded.entries[(n, allocation[n])])
    assert coded.bound_bytes(allocation) - exact == pytest.approx(room, abs=len(linears) * 4)
    assert coded.bound_bytes(allocation) >= exact
    # nothing grows without GPTQ's modules or without the lossless stage (same bytes as RTN then)
    assert SizeTable(model, allocation, 10).bound_bytes(allocation) == exact
    plain = SizeTable(model, allocation, None, grown=linears)
    assert plain.bound_bytes(allocation) == plain.file_bytes(allocation)
    # each option its measured growth, the largest for one not measured
    assert code_growth((2, 64)) == GPTQ_CODE_GROWTH[(2, 64)]
    assert code_growth((5, 17)) == max(GPTQ_CODE_GROWTH.values())
    assert all(g >= 1 for g in GPTQ_CODE_GROWTH.values())
