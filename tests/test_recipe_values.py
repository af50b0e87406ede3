"""Recipe values out of their useful range are refused in one line naming the key, the value and the
range: non-finite numbers, negative loss weights, group sizes whose scales cost float16 or more, and
ranks at or past the break-even of the layers they would factor."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_model, message_lines
from hypercompress.apply import apply_recipe
from hypercompress.storage.artifact import storage_bits
from hypercompress.cli import app
from hypercompress.errors import UserError
from hypercompress.planning.mixed_bits import plan_bits
from hypercompress.recipe import Recipe
from hypercompress.planning.target import PlanTarget

CALIB = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, item, needle", [
    ("distill", "lr=inf", "not a finite number"),
    ("hypernet", "stability_weight=nan", "not a finite number"),
    ("distill", "local_weight=-1", "local_weight=-1.0: a loss weight must be >= 0"),
    ("hypernet", "stability_weight=-0.5", "stability_weight=-0.5: a loss weight must be >= 0"),
    ("distill", "steps=0", "steps=0: must be >= 1"),
    ("rtn", "group_size=1", "group_size=1: with bits=4"),
    ("gptq", "group_size=3", "use group_size >= 4"),  # 8 bits: 8 + (16 + 8) / 3 = 16 bits per weight
])
def test_bad_values_are_refused_naming_key_value_and_range(method, item, needle):
    overrides = [item, "bits=8"] if method == "gptq" else [item]
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        Recipe.from_list([{"method": method}]).with_overrides(overrides)


def test_smallest_useful_group_is_accepted():
    for bits, group in ((8, 4), (4, 2), (2, 2)):
        Recipe.from_list([{"method": "rtn", "bits": bits, "group_size": group}])


def layers_storage(recipe: list[dict]) -> tuple[int, int]:
    model = make_model("llama")
    before = storage_bits(model)
    apply_recipe(model, Recipe.from_list(recipe), CALIB)
    return before, storage_bits(model)


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_rank_past_break_even_is_refused_with_the_largest_useful_rank(method):
    # the tiny llama's k_proj / v_proj are 32 x 64: rank 21 x (32 + 64) < 32 x 64 <= 22 x 96
    with pytest.raises(UserError, match=rf"{method}: rank=22 .*k_proj \(32x64\).* set rank to 1\.\.21"):
        layers_storage([{"method": method, "rank": 22}])
    before, after = layers_storage([{"method": method, "rank": 21}])
    assert after < before


def test_factor_embedding_rank_past_break_even_is_refused():
    # a 128 x 64 table: rank r at float16 stores 16 r (128 + 64) bits, under 16 x 128 x 64 up to r = 42
    stage = {"method": "factor_embedding", "bits": 16, "targets": ["^model\\.embed_tokens$"]}
    with pytest.raises(UserError, match=r"rank=43 .* the largest useful rank is 42"):
        layers_storage([{**stage, "rank": 43}])
    before, after = layers_storage([{**stage, "rank": 42}])
    assert after < before


def test_kv_and_hypernet_ranks_past_full_rank_are_refused():
    with pytest.raises(UserError, match=r"kv_lowrank: rank=65 is past the full rank 64"):
        layers_storage([{"method": "kv_lowrank", "rank": 65}])
    with pytest.raises(UserError, match=r"hypernet: rank=100000 .* set rank to 1\.\.32"):
        layers_storage([{"method": "hypernet", "rank": 100000, "steps": 1, "warm_steps": 0}])


def test_cli_svd_rank_beyond_break_even(model_dirs, tmp_path):
    out = tmp_path / "x"
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--method", "svd",
                                      "--set", "rank=100000", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and "rank=100000" in lines[0] and "1..21" in lines[0], result.stderr
    assert not out.exists()


def test_planner_group_sizes():
    with pytest.raises(UserError, match="group_size=1 must be at least 2"):
        PlanTarget.from_values(3.0, None, 1)
    with pytest.raises(UserError, match=r"group_size=48 divides none .*\(64, 128\); use one that does, e\.g\. 32, 64"):
        plan_bits(make_model("llama"), 4.0, CALIB, group=48)
