"""Structured pruning: removing blocks, MLP channels and head groups equals zeroing them in the dense
model; importance finds a block that does nothing; the smaller model reloads from its artifact."""

from __future__ import annotations

import copy

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.arch import arch_of
from hypercompress.errors import UserError
from hypercompress.methods.structured.importance import measure
from hypercompress.methods.structured.surgery import (drop_blocks, flops_per_token, keep_channels,
                                                      keep_groups)
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from conftest import DENSE_ARCHS, make_model, make_tokenizer

CALIB = torch.randint(1, 121, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def blocks(model):
    return model.get_submodule(arch_of(model.config.model_type).blocks)


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_removing_channels_equals_zeroing_their_down_columns(arch):
    model = make_model(arch)
    reference = copy.deepcopy(model)
    spec = arch_of(model.config.model_type)
    inner = 256 if spec.conv1d else 128  # gpt2: n_inner = 4 x n_embd
    keep = [torch.arange(0, inner, 3) for _ in range(2)]
    with torch.no_grad():
        for block in blocks(reference):
            down = block.get_submodule(spec.mlp_down).weight
            gone = torch.ones(inner, dtype=torch.bool)
            gone[keep[0]] = False
            if spec.conv1d:  # Conv1D keeps (in_features, out_features)
                down[gone] = 0
            else:
                down[:, gone] = 0
    keep_channels(model, keep)
    assert model.config.to_dict()[spec.intermediate_key] == keep[0].numel()
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)


def test_heads_whose_norm_spans_every_head_are_not_pruned():
    with pytest.raises(UserError, match="olmo2's q/k norms normalize all heads together"):
        apply_recipe(make_model("olmo2"), Recipe.from_list([{"method": "structured", "head_groups_keep": 0.5}]), CALIB)


@pytest.mark.parametrize("arch, head_dim", [("llama", 16), ("qwen3", 32), ("phi", 16)])  # qwen3: per-head q/k norms
def test_removing_a_head_group_equals_zeroing_its_query_heads_output(arch, head_dim):
    model = make_model(arch)  # 4 query heads; llama, qwen3: 2 key/value heads, phi: 4
    per_group = model.config.num_attention_heads // model.config.num_key_value_heads
    reference = copy.deepcopy(model)
    o_name = arch_of(model.config.model_type).attention[3]
    width = per_group * head_dim  # the o_proj columns of one group's query heads
    with torch.no_grad():
        for block in blocks(reference):  # every group but group 1 silenced
            weight = block.get_submodule(o_name).weight
            weight[:, :width] = 0
            weight[:, 2 * width:] = 0
    keep_groups(model, [torch.tensor([1]), torch.tensor([1])])
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == \
        (per_group, 1, head_dim)
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_dropping_a_block_equals_skipping_it(arch):
    model = make_model(arch)
    reference = copy.deepcopy(model)
    skip = blocks(reference)[0].register_forward_hook(
        lambda module, args, kwargs, out: (args[0] if args else kwargs["hidden_states"]) if torch.is_tensor(out)
        else ((args[0] if args else kwargs["hidden_states"]),) + tuple(out[1:]), with_kwargs=True)
    expected = reference(IDS).logits
    skip.remove()
    drop_blocks(model, [0])
    assert len(blocks(model)) == 1 and model.config.num_hidden_layers == 1
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert model.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)  # cache works


def test_block_influence_finds_a_block_that_does_nothing():
    model = make_model("llama")
    with torch.no_grad():
        blocks(model)[1].self_attn.o_proj.weight.zero_()
        blocks(model)[1].mlp.down_proj.weight.zero_()
    scores = measure(model, CALIB)
    assert scores.blocks[1] == pytest.approx(0, abs=1e-6) and scores.blocks[0] > 1e-3
    assert [s.shape for s in scores.channels] == [(128,), (128,)]
    assert [s.shape for s in scores.groups] == [(2,), (2,)]
    apply_recipe(model, Recipe.from_list([{"method": "structured", "drop_layers": 1, "mlp_keep": 1.0}]), CALIB)
    assert len(blocks(model)) == 1 and blocks(model)[0].mlp.down_proj.weight.abs().sum() > 0


def test_pruned_model_is_smaller_and_reloads(tmp_path):
    model = make_model("llama")
    params, flops = count_params(model), flops_per_token(model)
    recipe = Recipe.from_list([{"method": "structured", "drop_layers": 1, "mlp_keep": 0.5,
                                "head_groups_keep": 0.5}])
    apply_recipe(model, recipe, CALIB)
    assert count_params(model) < params and flops_per_token(model) < flops
    path = artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=recipe.to_list(), original_params=params)
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    assert (path / artifact.WEIGHTS).stat().st_size < 2 * count_params(model) + 4096  # float16 + header


def test_structured_then_quantization_composes():
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([{"method": "structured", "mlp_keep": 0.5},
                                      {"method": "rtn", "bits": 4, "group_size": 32}]), CALIB)
    assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("stages, message", [
    ([{"method": "rtn", "bits": 4}, {"method": "structured"}], "put it first"),
    ([{"method": "structured", "drop_layers": 2}], "keep at least one"),
])
def test_impossible_requests_are_one_line_errors(stages, message):
    with pytest.raises(UserError, match=message):
        apply_recipe(make_model("llama"), Recipe.from_list(stages), CALIB)


def test_fused_gpt2_and_phi3_heads_and_empty_configs_are_refused():
    for arch in ("gpt2", "phi3"):
        with pytest.raises(UserError, match="fused in one linear"):
            apply_recipe(make_model(arch), Recipe.from_list([{"method": "structured", "head_groups_keep": 0.5}]), CALIB)
    with pytest.raises(UserError, match="removes nothing"):
        Recipe.from_list([{"method": "structured", "mlp_keep": 1.0}])


@pytest.mark.parametrize("arch, stage", [("olmo2", ["--method", "structured", "--set", "head_groups_keep=0.5"]),
                                         ("phi3", ["--method", "kv_lowrank"]), ("phi", ["--method", "rotate"])])
def test_a_family_a_stage_refuses_leaves_nothing_and_calibrates_nothing(arch, stage, model_dirs, calib_file, tmp_path):
    """Refused right after loading: no OUT, no OUT.checkpoint, no calibration progress."""
    from typer.testing import CliRunner

    from hypercompress.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(model_dirs[arch]), *stage, "--calib", str(calib_file),
                                      "--calib-samples", "2", "--calib-len", "32", "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and len(lines) == 1 and arch in lines[0], result.output
    assert "calibration windows" not in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())
