"""Embedding quantization (tied heads stored once) and activation-aware low-rank."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.layers import LowRankEmbedding, QuantEmbedding, TiedHead
from hypercompress.methods.asvd import ActivationAwareSVD, AsvdConfig
from hypercompress.methods.svd import SVD, SvdConfig
from hypercompress.sources.models import load_model
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

EMBED_RECIPE = [{"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"wte$"]},
                {"method": "rtn", "bits": 4, "group_size": 32}]


def test_tied_embedding_is_quantized_once_and_the_head_follows(model_dirs, tokens, tmp_path):
    loaded = load_model(str(model_dirs["gpt2"]))
    params = count_params(loaded.model)
    dense_bits = artifact.storage_bits(loaded.model)
    apply_recipe(loaded.model, Recipe.from_list(EMBED_RECIPE))
    model = loaded.model
    assert isinstance(model.transformer.wte, QuantEmbedding)
    assert isinstance(model.lm_head, TiedHead)
    table = model.transformer.wte.dense_weight()
    assert torch.allclose(model.transformer.wte(tokens), table[tokens])
    hidden = torch.randn(2, 64)
    assert torch.allclose(model.lm_head(hidden), hidden @ table.T, atol=1e-5)
    path = artifact.save(model, loaded.tokenizer, tmp_path / "a", recipe=EMBED_RECIPE,
                         original_params=params)
    manifest = json.loads((path / artifact.MANIFEST).read_text())
    assert manifest["modules"]["lm_head"] == {"kind": "tied_head", "layout": {"source": "transformer.wte"}}
    assert manifest["aliases"] == {}
    assert artifact.storage_bits(model) < dense_bits / 2  # position embeddings stay 16-bit
    reloaded, _ = artifact.load(path, fast=False)  # the stored tensors exactly
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    fast, _ = artifact.load(path, dtype=torch.bfloat16)  # the head through the embedding's int4 codes
    assert fast.hypercompress_backends["lm_head"].startswith("int4 tinygemm")
    expected = model(tokens).logits
    assert torch.allclose(fast(tokens).logits.float(), expected, atol=3e-2 * expected.abs().max().item())


def test_tied_head_alone_is_refused(model_dirs):
    from hypercompress.errors import UserError

    loaded = load_model(str(model_dirs["gpt2"]))
    with pytest.raises(UserError, match="target the embedding"):
        apply_recipe(loaded.model, Recipe.from_list([{"method": "rtn", "targets": ["lm_head"]}]))


def test_untied_embedding_and_head_are_quantized_separately(model_dirs, tokens):
    loaded = load_model(str(model_dirs["llama"]))
    recipe = [{"method": "rtn", "bits": 8, "group_size": 32, "targets": ["embed_tokens", "lm_head"]}]
    dense_logits = loaded.model(tokens).logits
    apply_recipe(loaded.model, Recipe.from_list(recipe))
    assert isinstance(loaded.model.model.embed_tokens, QuantEmbedding)
    assert not isinstance(loaded.model.lm_head, TiedHead)
    assert torch.allclose(loaded.model(tokens).logits, dense_logits, atol=0.05)


def low_rank_problem():
    """Inputs with a few dominant directions: output error is what activation-awareness targets."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(64, 64, generator=generator)
    scales = torch.logspace(1, -2, 64)
    X = (torch.randn(2000, 64, generator=generator) * scales) @ basis
    layer = nn.Linear(64, 48, bias=False)
    layer.weight.data = torch.randn(48, 64, generator=generator)
    return layer, X


@pytest.mark.parametrize("whitening", ["cholesky", "scale"])
def test_activation_aware_beats_plain_svd_on_outputs(whitening):
    layer, X = low_rank_problem()
    method = ActivationAwareSVD(AsvdConfig(rank=8, whitening=whitening))
    method.observe("x", X)
    aware = method.compress("x", layer)
    plain = SVD(SvdConfig(rank=8)).compress("x", layer)
    with torch.no_grad():
        target = layer(X)
        aware_error = (aware(X) - target).norm()
        plain_error = (plain(X) - target).norm()
    assert aware_error < plain_error
    assert aware.storage_bits() == plain.storage_bits()


def test_svd_llm_whitening_is_truncation_aware():
    """With S S^T = X X^T, the output error equals the norm of the truncated singular values."""
    layer, X = low_rank_problem()
    method = ActivationAwareSVD(AsvdConfig(rank=10, damp=0.0))
    method.observe("x", X)
    aware = method.compress("x", layer)
    S = torch.linalg.cholesky(X.double().T @ X.double())
    s = torch.linalg.svdvals(layer.weight.double() @ S)
    with torch.no_grad():
        error = ((aware.dense_weight().double() - layer.weight.double()) @ X.double().T).norm()
    assert error.item() == pytest.approx(s[10:].norm().item(), rel=0.02)


@pytest.mark.parametrize("bits", [16, 4])
def test_factorized_embedding_keeps_the_tie_and_reloads_exactly(model_dirs, tokens, tmp_path, bits):
    loaded = load_model(str(model_dirs["gpt2"]))
    model, params = loaded.model, count_params(loaded.model)
    table = model.transformer.wte.weight.detach().clone()
    recipe = [{"method": "factor_embedding", "rank": 16, "bits": bits, "targets": [r"wte$"]}]
    before = artifact.storage_bits(model)
    apply_recipe(model, Recipe.from_list(recipe))
    embedding = model.transformer.wte
    assert isinstance(embedding, LowRankEmbedding) and isinstance(model.lm_head, TiedHead)
    vocab, dim = table.shape
    a_bits = vocab * 16 * bits + (0 if bits == 16 else 32 * vocab)
    assert embedding.storage_bits() == a_bits + 16 * 16 * dim
    assert before - artifact.storage_bits(model) == 16 * vocab * dim - embedding.storage_bits()
    made = embedding.dense_weight()
    best = torch.linalg.svdvals(table)[16:].pow(2).sum()  # the rank-16 optimum (Eckart-Young)
    assert (made - table).pow(2).sum() < (1.0001 if bits == 16 else 1.5) * best
    hidden = torch.randn(3, dim)
    assert torch.allclose(model.lm_head(hidden), hidden @ made.T, atol=1e-4)  # logits through A, B
    assert torch.allclose(embedding(tokens), made[tokens], atol=1e-5)
    logits = model(tokens).logits
    path = artifact.save(model, loaded.tokenizer, tmp_path / "f", recipe=recipe, original_params=params)
    reloaded, _ = artifact.load(path)
    assert isinstance(reloaded.lm_head, TiedHead)
    assert torch.equal(reloaded(tokens).logits, logits)


def test_factor_embedding_refuses_a_linear(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    recipe = [{"method": "factor_embedding", "rank": 8, "targets": [r"layers\.0\.mlp\.up_proj$"]}]
    with pytest.raises(UserError, match="not an embedding"):
        apply_recipe(model, Recipe.from_list(recipe))


@pytest.mark.parametrize("arch, embedding", [("llama", "model.embed_tokens"), ("gpt2", "transformer.wte")])
def test_factor_embedding_without_targets_factors_the_token_embedding(model_dirs, arch, embedding):
    """A stage with no targets selects what its method is for: the architecture table's token
    embedding here (the block linears for every other method), nothing else."""
    model = load_model(str(model_dirs[arch])).model
    report = apply_recipe(model, Recipe.from_list([{"method": "factor_embedding", "rank": 8}]))
    assert report["stages"][0]["modules"] == 1
    assert isinstance(model.get_submodule(embedding), LowRankEmbedding)
    assert not any(isinstance(m, LowRankEmbedding) for n, m in model.named_modules() if n != embedding)
