"""The budget planner: allocation under a budget, sensitivity, and the CLI target."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hypercompress.cli import app
from hypercompress.errors import UserError
from hypercompress.models import load_model
from hypercompress.planner import allocate, measure_sensitivity, plan_bits, plan_recipe
from hypercompress.recipe import Recipe


def test_allocation_fits_the_budget_and_favours_robust_modules():
    costs = {"a": {2: 20, 4: 40, 8: 80}, "b": {2: 20, 4: 40, 8: 80}}
    loss = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.1, 8: 0.0}}
    choice = allocate(costs, loss, budget_bits=60)
    assert choice == {"a": 4, "b": 2}
    assert allocate(costs, loss, budget_bits=1000) == {"a": 8, "b": 8}
    assert sum(costs[n][b] for n, b in allocate(costs, loss, 100).items()) <= 100


def test_sensitivity_grows_as_bits_shrink(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    samples = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj"
    before = model.get_submodule(name).weight.clone()
    result = measure_sensitivity(model, {name: (2, 4, 8)}, samples, group=32)
    assert result[name][2] > result[name][4] > result[name][8] >= 0  # KL clamped at 0
    assert torch.equal(model.get_submodule(name).weight, before)  # restored


def test_plan_hits_the_target_and_becomes_a_recipe(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    samples = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = plan_bits(model, 6.0, samples, group=32)
    assert 0.95 * 6.0 <= plan.bits_per_weight <= 6.0
    stages = plan_recipe(plan, "model.embed_tokens", group=32)
    recipe = Recipe.from_list(stages)
    assert recipe.stages[0].method == "rtn" and all(s.method == "gptq" for s in recipe.stages[1:])
    with pytest.raises(UserError, match="smallest plan"):
        plan_bits(model, 1.0, samples, group=32)


def test_cli_target_bpw_writes_an_artifact_near_the_target(model_dirs, calib_file, tmp_path):
    out = tmp_path / "planned"
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--target-bpw", "6",
                                      "--set", "group_size=32", "--calib", str(calib_file),
                                      "--calib-samples", "4", "--calib-len", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "hypercompress.json").read_text())
    assert manifest["totals"]["tensor_bits"] / manifest["original_params"] <= 6.0
    assert manifest["recipe"][0]["method"] == "rtn"
    bad = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--target-bpw", "6",
                                   "--method", "rtn", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "drop --recipe/--method" in bad.stderr
