"""Mixtures of experts (Mixtral, Qwen3-MoE, OLMoE): one linear per expert matrix (experts.py), each
expert calibrated on the tokens routed to it (topped up to a stated minimum, counts reported), the
router kept in 16 bits, artifacts reloaded exactly, exports and plain saves in transformers' fused
layout, and the methods that cannot handle experts refusing by name. The contract suite
(test_contract.py) runs every method on the three tiny families."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import hypercompress
from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.experts import MIN_EXPERT_TOKENS, ExpertLinears, fuse_experts, unfuse_experts
from hypercompress.sources.models import load_model
from hypercompress.recipe import Recipe

from conftest import MOE, make_model, make_tokenizer

CALIB = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", sorted(MOE))
def test_unfused_experts_compute_what_the_fused_ones_do(arch):
    model = make_model(arch)
    reference = logits(model)
    unfuse_experts(model)
    experts = [m for m in model.modules() if isinstance(m, ExpertLinears)]
    assert experts and all(len(e) == 4 for e in experts)
    assert torch.allclose(logits(model), reference, atol=1e-5)  # transformers' grouped_mm rounds otherwise
    assert not any(p.device.type == "meta" for p in model.parameters())
    fuse_experts(model)
    assert torch.equal(logits(model), reference)
    assert set(model.state_dict()) == set(make_model(arch).state_dict())


@pytest.mark.parametrize("arch", sorted(MOE))
def test_gptq_calibrates_each_expert_on_its_tokens_and_reports_them(arch, tmp_path):
    model = make_model(arch)
    report = apply_recipe(model, Recipe.from_list([{"method": "gptq", "bits": 4, "group_size": 16}]), CALIB)
    routing = report["stages"][0]["expert_tokens"]
    assert routing["min_tokens"] == MIN_EXPERT_TOKENS
    tokens = CALIB.numel()
    for name, counts in routing["experts"].items():
        assert len(counts) == 4
        assert sum(routed for routed, _ in counts) == tokens * 2  # two experts per token
        # fewer calibration tokens than the minimum: every expert sees them all (its own, then the others)
        assert all(routed + added == min(MIN_EXPERT_TOKENS, tokens) for routed, added in counts)
    sparse_blocks = 1 if arch == "qwen3_moe" else 2  # Qwen3-MoE's second block is dense here
    assert len(routing["experts"]) == sparse_blocks
    names = {n for n, m in model.named_modules() if isinstance(m, hypercompress.layers.QuantLinear)}
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert not any(".mlp.gate" in n and "gate_up" not in n and "gate_proj" not in n for n in names)
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router: left as it is...
    out = artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=[], original_params=1)
    modules = json.loads((out / "hypercompress.json").read_text())["modules"]
    assert not any(n.endswith("mlp.gate") for n in modules)  # ...and stored as a 16-bit tensor
    reloaded, _ = artifact.load(out, fast=False)
    assert torch.equal(logits(reloaded), logits(model))
    through_transformers = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(through_transformers), logits(model), atol=1e-4)


def test_an_expert_no_calibration_token_reaches_is_topped_up_and_solved():
    class FirstTwo(torch.nn.Module):  # a router sending every token to experts 0 and 1
        def forward(self, hidden):
            count = hidden.shape[0]
            return (torch.zeros(count, 4), torch.full((count, 2), 0.5),
                    torch.tensor([[0, 1]]).expand(count, 2))

    model = make_model("mixtral")
    for block in model.model.layers:
        block.mlp.gate = FirstTwo()
    calib = torch.randint(1, 121, (20, 32), generator=torch.Generator().manual_seed(2))
    report = apply_recipe(model, Recipe.from_list([{"method": "gptq", "bits": 4, "group_size": 16}]), calib)
    for counts in report["stages"][0]["expert_tokens"]["experts"].values():
        assert [routed for routed, _ in counts[2:]] == [0, 0]
        assert [added for _, added in counts[2:]] == [MIN_EXPERT_TOKENS] * 2
        assert [added for _, added in counts[:2]] == [0, 0]  # 640 routed tokens each: above the minimum
    assert torch.isfinite(logits(model)).all()


def test_a_plain_save_of_an_unfused_model_writes_transformers_layout(model_dirs, tmp_path):
    loaded = load_model(str(model_dirs["mixtral"]))
    assert any(isinstance(m, ExpertLinears) for m in loaded.model.modules())
    loaded.model.save_pretrained(tmp_path / "plain")
    assert any(isinstance(m, ExpertLinears) for m in loaded.model.modules())  # unfused again after
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.allclose(logits(again), logits(loaded.model), atol=1e-5)


def test_blocks_and_heads_are_pruned_and_channels_refused():
    model = make_model("mixtral")
    apply_recipe(model, Recipe.from_list([{"method": "structured", "mlp_keep": 1.0, "head_groups_keep": 0.5,
                                       "drop_layers": 1}]), CALIB)
    assert len(model.model.layers) == 1 and model.config.num_key_value_heads == 1
    assert torch.isfinite(logits(model)).all()
    with pytest.raises(UserError, match="mlp_keep: mixtral's MLP is a mixture of experts"):
        apply_recipe(make_model("mixtral"), Recipe.from_list([{"method": "structured"}]), CALIB)


@pytest.mark.parametrize("stage, needle", [
    ({"method": "rotate"}, "rotate: qwen3_moe routes its MLP through experts"),
    ({"method": "hypernet"}, "hypernet: qwen3_moe is a mixture of experts"),
])
def test_methods_that_cannot_handle_experts_refuse_by_name(stage, needle):
    with pytest.raises(UserError, match=needle):
        apply_recipe(make_model("qwen3_moe"), Recipe.from_list([stage]), CALIB)


def test_edits_gguf_and_streaming_refuse_a_mixture_by_name(model_dirs, tmp_path):
    from hypercompress.arch import residual_writer_names
    from hypercompress.exporters.gguf_writer import gguf_arch
    from hypercompress.sources.streaming import load_streamed

    with pytest.raises(UserError, match="olmoe routes each token to its own experts"):
        residual_writer_names(make_model("olmoe"))
    with pytest.raises(UserError, match="'mixtral' cannot be exported to GGUF here"):
        gguf_arch("mixtral")
    with pytest.raises(UserError, match="--stream-blocks does not read a mixture of experts"):
        load_streamed(str(model_dirs["mixtral"]))


def test_experts_in_another_layout_are_refused_by_name():
    model = make_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.data[:, :, :8].clone())  # not (E, D, I)
    with pytest.raises(UserError, match="model.layers.0.mlp.experts: experts not in transformers' fused layout"):
        unfuse_experts(model)


def test_a_block_whose_hessians_outgrow_the_budget_is_observed_in_groups(monkeypatch):
    """With room for two 64 x 64 float64 Hessians, GPTQ observes a Mixtral block's linears a few at a
    time (the block re-run per group): never more statistics than the budget, every linear solved."""
    from hypercompress import layerwise as calibration
    from hypercompress.methods.gptq import GPTQ, GptqConfig

    budget = 2 * 64 * 64 * 8
    monkeypatch.setattr(calibration, "OBSERVED_BUDGET_BYTES", budget)
    model = unfuse_experts(make_model("mixtral"))
    method = GPTQ(GptqConfig(bits=4, group_size=16))
    live, observe = [], method.observe

    def counted(name, x):
        observe(name, x)
        live.append(sum(t.numel() * t.element_size() for t in method._sums.values()))
    monkeypatch.setattr(method, "observe", counted)
    passes = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: passes.append(1))
    names = hypercompress.arch.block_linear_names(model)
    calibration.run_layerwise(model, method, names, CALIB, batch_size=6)
    assert max(live) <= budget
    assert len(passes) > 2  # several observing passes of block 0, then its output pass
    assert all(isinstance(model.get_submodule(n), hypercompress.layers.QuantLinear) for n in names)
    assert torch.isfinite(logits(model)).all()


def test_the_cli_says_how_many_experts_were_short_and_the_artifact_records_the_counts(model_dirs, calib_file,
                                                                                     tmp_path):
    from typer.testing import CliRunner

    from hypercompress.cli import app

    result = CliRunner().invoke(app, ["compress", str(model_dirs["mixtral"]), "--method", "gptq", "--set", "bits=4",
                                      "--set", "group_size=16", "--calib", str(calib_file), "--calib-len", "8",
                                      "--calib-samples", "4", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "of 8 experts were routed fewer than 256 calibration tokens" in result.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    routing = summary["expert_tokens"]["0"]
    assert routing["min_tokens"] == 256 and len(routing["experts"]) == 2
    assert all(routed + added == 32 for per in routing["experts"].values() for routed, added in per)


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_a_config_routing_to_more_experts_than_there_are_is_refused_on_load(top_k, tmp_path):
    model = make_model("mixtral")
    model.config.num_experts_per_tok = top_k
    with pytest.raises(UserError, match=rf"num_experts_per_tok {top_k} in the model's config: .* 1 to 4 "):
        unfuse_experts(model)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="num_experts_per_tok"):
        load_model(str(tmp_path / "m"))
