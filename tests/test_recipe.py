from pathlib import Path

import pytest

from hypercompress.errors import UserError
from hypercompress.sources.models import load_model
from hypercompress.modules import select_linears
from hypercompress.recipe import Recipe
from hypercompress.planning.target import PlanTarget, load_recipe_file


def two_stages():
    return Recipe.from_list([
        {"method": "rtn", "bits": 4, "targets": ["mlp"]},
        {"method": "svd", "keep": 0.5, "targets": ["attn"]},
    ])


def test_yaml_round_trip(tmp_path):
    recipe = two_stages()
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path).to_list() == recipe.to_list()


def test_shipped_recipes_load():
    assert Recipe.from_yaml("recipes/rtn-w4g64.yaml").stages[0].config.group_size == 64
    assert Recipe.from_yaml("recipes/svd-50.yaml").stages[0].config.keep == 0.5
    for path in Path("recipes").glob("*.yaml"):
        loaded = load_recipe_file(path)  # stages, or a planner target (tests/test_planner.py)
        assert isinstance(loaded, PlanTarget) or loaded.stages, path


@pytest.mark.parametrize("text, key, line", [
    ("- method: rtn\n  bits: 4\n  group_size: 64\n  bits: 2\n", "bits", 4),
    ("target_bpw: 3.0\ntarget_bpw: 4.0\n", "target_bpw", 2),
    ("- {method: rtn, bits: 4, bits: 3}\n", "bits", 1),
])
def test_a_key_named_twice_is_refused_with_its_line(tmp_path, text, key, line):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"key '{key}' twice in one mapping \\(line {line}\\)"):
        load_recipe_file(path)


def test_the_same_key_in_two_stages_is_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- method: rtn\n  bits: 4\n- method: gptq\n  bits: 3\n")
    assert [s.config.bits for s in load_recipe_file(path).stages] == [4, 3]


def test_mapping_with_stages_is_accepted():
    assert Recipe.from_list({"stages": [{"method": "rtn"}]}).stages[0].method == "rtn"


@pytest.mark.parametrize("override, bits", [("bits=3", [3]), ("0.bits=3", [3]), ("rtn.bits=2", [2])])
def test_overrides_reach_the_right_stage(override, bits):
    recipe = two_stages().with_overrides([override])
    assert [recipe.stages[0].config.bits] == bits
    assert recipe.stages[1].config.keep == 0.5


def test_override_targets_as_comma_list():
    recipe = two_stages().with_overrides(["1.ignore=layers\\.0\\.,layers\\.1\\.q"])
    assert recipe.stages[1].ignore == ["layers\\.0\\.", "layers\\.1\\.q"]


def test_override_targets_as_a_yaml_list_is_a_list_not_one_bracketed_regex():
    recipe = two_stages().with_overrides(["1.targets=['embed_tokens$', 'q_proj']"])
    assert recipe.stages[1].targets == ["embed_tokens$", "q_proj"]
    with pytest.raises(UserError, match=r"not a list of regex strings; write targets=a,b"):
        two_stages().with_overrides(["1.targets=[1, 2]"])


@pytest.mark.parametrize("override, needle", [
    ("svd.bits=3", "no stage has key 'bits'"),
    ("keep=1.5", "keep=1.5"),
    ("1.rank=0", "rank=0"),
    ("zero_point=half", "zero_point"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(UserError, match=needle):
        two_stages().with_overrides([override])


def test_selection_defaults_to_block_linears_and_honours_ignore(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    names = select_linears(model, None, [])
    assert len(names) == 14 and "lm_head" not in names
    kept = select_linears(model, None, [r"layers\.0\.", r"\.mlp\."])
    assert kept == [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert select_linears(model, ["lm_head"], []) == ["lm_head"]  # untied: allowed


def test_gpt2_conv1d_layers_are_found(model_dirs):
    model = load_model(str(model_dirs["gpt2"])).model
    assert select_linears(model, None, [])[:4] == [
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
