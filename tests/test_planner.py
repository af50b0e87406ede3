"""The budget planner: allocation under a budget, sensitivity, and the CLI target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hypercompress.cli import app
from hypercompress.errors import UserError
from hypercompress.sources.models import load_model
from hypercompress.planning.mixed_bits import allocate, linear_options, measure_sensitivity, plan_bits, plan_recipe
from hypercompress.recipe import Recipe
from hypercompress.planning.target import PlanTarget, load_recipe_file


def test_allocation_fits_the_budget_and_favours_robust_modules():
    costs = {"a": {2: 20, 4: 40, 8: 80}, "b": {2: 20, 4: 40, 8: 80}}
    loss = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.1, 8: 0.0}}
    choice = allocate(costs, loss, budget_bits=60)
    assert choice == {"a": 4, "b": 2}
    assert allocate(costs, loss, budget_bits=1000) == {"a": 8, "b": 8}
    assert sum(costs[n][b] for n, b in allocate(costs, loss, 100).items()) <= 100


def test_allocation_walks_the_convex_hull_of_options():
    # option labels are free-form; "bad" is dominated (costs more than "g64" and loses more)
    costs = {"a": {"row": 30, "g64": 50, "bad": 60, "w8": 80}, "b": {"row": 30, "g64": 50, "w8": 80}}
    loss = {"a": {"row": 2.0, "g64": 0.5, "bad": 1.9, "w8": 0.0}, "b": {"row": 0.2, "g64": 0.1, "w8": 0.0}}
    assert allocate(costs, loss, 100) == {"a": "g64", "b": "g64"}
    assert allocate(costs, loss, 110) == {"a": "w8", "b": "row"}  # 0.2 lost, not 0.6 or "bad"
    assert allocate(costs, loss, 80) == {"a": "g64", "b": "row"}  # b loses least per bit saved
    assert allocate(costs, loss, 10) == {"a": "row", "b": "row"}  # cannot fit: the cheapest there is


def test_planner_recipe_files(tmp_path):
    good = tmp_path / "plan.yaml"
    good.write_text("target_ratio: 4\ngroup_size: 32\n")
    assert load_recipe_file(good) == PlanTarget(4.0, 32)
    for text, needle in [("target_bpw: 3\nbits: 4\n", "unknown planner key"),
                         ("target_bpw: 3\ntarget_ratio: 4\n", "exactly one"),
                         ("target_bpw: 17\n", "above 0 and below 16"),
                         ("target_bpw: three\n", "must be numbers")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=needle):
            load_recipe_file(bad)
    shipped = sorted((Path(__file__).parents[1] / "recipes").glob("planner-*.yaml"))
    assert [load_recipe_file(p).bits_per_weight for p in shipped] == [2.0, 2.5, 3.0, 4.0]


def test_sensitivity_grows_as_bits_shrink(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    samples = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj"
    before = model.get_submodule(name).weight.clone()
    result = measure_sensitivity(model, {name: ((2, 32), (4, 32), (4, -1), (8, 32))}, samples)
    kl = {bits: result[name][(bits, 32)] for bits in (2, 4, 8)}
    assert kl[2] > kl[4] > kl[8] >= 0  # KL clamped at 0
    assert result[name][(4, -1)] > kl[4]  # one scale per row is coarser than groups of 32
    assert torch.equal(model.get_submodule(name).weight, before)  # restored


def test_plan_hits_the_target_and_becomes_a_recipe(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    samples = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = plan_bits(model, 6.0, samples, group=32)
    assert 0.95 * 6.0 <= plan.bits_per_weight <= 6.0
    stages = plan_recipe(plan, "model.embed_tokens")
    recipe = Recipe.from_list(stages)
    assert recipe.stages[0].method == "rtn" and all(s.method == "gptq" for s in recipe.stages[1:])
    assert {(s["bits"], s["group_size"]) for s in stages[1:]} <= set(linear_options(32))
    named = [t for s in stages[1:] for t in s["targets"]]
    assert len(named) == len(set(named)) == len(plan.allocation) - 1  # every linear exactly once
    with pytest.raises(UserError, match="smallest plan"):
        plan_bits(model, 1.0, samples, group=32)


def test_the_probe_moves_its_captured_block_arguments_to_the_samples_device(model_dirs, monkeypatch):
    """The capture keeps block arguments (masks, rotary tables) on the CPU; the probe must move them
    to where its samples and blocks are (on a GPU they stayed behind and the rotary product failed)."""
    from hypercompress.block_calls import BlockCalls
    from hypercompress.planning.sensitivity import TailRunner

    moved, real_to = [], BlockCalls.to
    monkeypatch.setattr(BlockCalls, "to", lambda self, device: moved.append(device) or real_to(self, device))
    model = load_model(str(model_dirs["llama"])).model
    samples = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))
    runner = TailRunner(model, samples, 2)
    assert moved == [samples.device]
    assert all(t.device == samples.device for batches in runner.calls.calls for args, kwargs in batches
               for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plan_on_a_gpu_runs_and_matches_the_cpu_plan(model_dirs):
    """The sensitivity probe runs on --device (its captured block arguments follow the samples
    there; a GPU run once failed with cuda/cpu tensors mixed in the rotary embedding)."""
    model = load_model(str(model_dirs["llama"])).model
    samples = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))
    on_cpu = plan_bits(model, 6.0, samples, group=32)
    on_gpu = plan_bits(model, 6.0, samples, group=32, device="cuda")
    assert set(on_gpu.allocation) == set(on_cpu.allocation)  # options may differ where KLs tie to rounding
    assert 0.95 * 6.0 <= on_gpu.bits_per_weight <= 6.0
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was


def test_cli_target_bpw_writes_an_artifact_near_the_target(model_dirs, calib_file, tmp_path):
    out = tmp_path / "planned"
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--target-bpw", "6",
                                      "--set", "group_size=32", "--calib", str(calib_file),
                                      "--calib-samples", "4", "--calib-len", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "hypercompress.json").read_text())
    assert manifest["totals"]["tensor_bits"] / manifest["original_params"] <= 6.0
    # the plan's recipe (its embedding's RTN stage first), or the same plan after `rotate` when the
    # trials keep the rotated candidate
    assert [s["method"] for s in manifest["recipe"][:2]] in (["rtn", "gptq"], ["rotate", "rtn"])
    summary = json.loads((out / "summary.json").read_text())  # the planning evidence, kept with the artifact
    planned = summary["allocation"]
    assert summary["target_bpw"] == 6.0 and planned["route"] == "planner"
    assert set(planned["options"]) == set(planned["sensitivity_kl"]) and planned["trial_kl"]["planned"] >= 0
    table = planned["size_table"]
    assert table["measured_bytes"] == manifest["totals"]["safetensors_bytes"]
    assert table["predicted_bytes_at_most"] >= table["predicted_rtn_bytes"] > 0
    assert abs(table["measured_over_predicted"] - 1) < 0.05  # GPTQ's codes store what RTN's do, near enough
    planfile = tmp_path / "plan.yaml"
    planfile.write_text("target_bpw: 6\ngroup_size: 32\n")
    viafile = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--recipe", str(planfile),
                                       "--calib", str(calib_file), "--calib-samples", "4",
                                       "--calib-len", "64", "--out", str(tmp_path / "viafile")])
    assert viafile.exit_code == 0, viafile.output
    assert json.loads((tmp_path / "viafile" / "hypercompress.json").read_text())["recipe"] == manifest["recipe"]
    bad = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--target-bpw", "6",
                                   "--method", "rtn", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "drop --recipe/--method" in bad.stderr
