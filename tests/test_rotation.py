"""`rotate`: the residual stream's rotation invariance, folded into the weights (QuaRot R1 / SliceGPT)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.methods.rotation import orthogonal_matrix, rotate_residual
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from conftest import make_model, make_tokenizer


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms that are not all ones, so folding them matters
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("dim", [64, 96, 576, 7])
def test_the_rotation_is_orthogonal(dim):
    Q = orthogonal_matrix(dim, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, orthogonal_matrix(dim, seed=3))


def with_scaled_norms(arch):
    """Every norm's scale away from 1; Qwen3's per-head q/k norms too (they act after q/k_proj, which
    the rotation leaves alone, so they keep their scales); Phi-3's fused qkv / gate_up read the norms."""
    model = make_model(arch)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("build", [lambda: make_model("llama"), tied_llama, lambda: with_scaled_norms("qwen3"),
                                   lambda: with_scaled_norms("phi3")])
def test_rotation_leaves_the_logits_unchanged_in_float(build, tokens):
    model = build()
    head_norms = {n: p.clone() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    before = model(tokens).logits
    rotate_residual(model, seed=0)
    after = model(tokens).logits
    assert torch.allclose(after, before, rtol=0, atol=1e-4 * before.abs().max().item())
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n and n not in head_norms)  # folded
    assert all(torch.equal(p, head_norms[n]) for n, p in model.named_parameters() if n in head_norms)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: the head folds the norm


def test_rotation_spreads_outlier_channels(tokens):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, 5] *= 40  # one outlier input channel
    weight = model.model.layers[0].mlp.up_proj.weight
    ratio_before = (weight.abs().max() / weight.abs().mean()).item()
    rotate_residual(model, seed=0)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert (weight.abs().max() / weight.abs().mean()).item() < ratio_before / 4


def test_a_rotated_and_quantized_model_saves_and_reloads_exactly(tmp_path, tokens):
    model = tied_llama()
    params = count_params(model)
    recipe = Recipe.from_list([{"method": "rotate"}, {"method": "rtn", "bits": 4, "group_size": 32}])
    apply_recipe(model, recipe)
    path = artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=recipe.to_list(), original_params=params)
    reloaded, _ = artifact.load(path, fast=False)
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_a_post_norm_family_is_refused_by_what_it_lacks():
    with pytest.raises(UserError, match="olmo2 normalizes after its sublayers .*rotate supports llama, mistral, phi3, qwen2, qwen3"):
        rotate_residual(make_model("olmo2"))


def test_rotation_is_refused_where_it_is_not_exact():
    with pytest.raises(UserError, match="LayerNorm"):
        rotate_residual(make_model("gpt2"))
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 32}]))
    with pytest.raises(UserError, match="first in the recipe"):
        rotate_residual(model)
