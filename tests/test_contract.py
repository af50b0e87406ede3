"""The contract every registered method keeps, on every architecture in the tests."""

from __future__ import annotations

import copy

import pytest
import torch

import hypercompress
from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.sources.models import load_model
from hypercompress.layers.base import CompressedModule
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe
from hypercompress.methods import get_method

from conftest import ARCHS

METHODS = hypercompress.list_methods()
# trained methods run a few steps, embedding methods target the embeddings; (a fast suite); distill trains what an earlier svd stage made
QUICK = {"hypernet": {"warm_steps": 5, "steps": 5}, "kan": {"steps": 3}, "distill": {"steps": 3},
         "qat": {"bits": 4, "group_size": 32, "block_steps": 2, "steps": 2, "batch": 2},
         "factor_embedding": {"rank": 8, "targets": ["embed_tokens$", "wte$"]}, "kv_lowrank": {"keep": 0.25}}
BEFORE = {"distill": [{"method": "svd", "rank": 4}]}
AFTER = {"rotate": [{"method": "rtn", "bits": 4, "group_size": 32}]}  # rotate compresses nothing by itself
STRUCTURAL = {"structured"}  # shrink the model itself: no compressed module, fewer dense tensors
# the families a method works on; on the others it refuses by name (asserted below): kv_lowrank needs
# separate k/v and a llama-family attention, rotate RMSNorm pre-norm blocks (no experts), hypernet and
# structured's MLP channels a dense MLP
DENSE = {"llama", "gpt2", "qwen3", "olmo2", "phi3", "phi", "gemma2", "gemma3"}
ARCH_ONLY = {"kv_lowrank": {"llama", "qwen3", "olmo2", "mixtral", "qwen3_moe", "olmoe"}, "rotate": {"llama", "qwen3", "phi3"},
             "hypernet": DENSE, "structured": DENSE}  # (mixtures of experts: tests/test_moe.py prunes blocks and heads)
REFUSALS = {"kv_lowrank": "kv_lowrank", "rotate": "rotate: .* (normalizes|routes)", "hypernet": "hypernet: .* mixture of experts",
            "structured": "mlp_keep: .* mixture of experts"}


def calibration(seed=0):
    return torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(seed))


def compressed_artifact(model_dir, method, out, seed=0):
    torch.manual_seed(seed)
    loaded = load_model(str(model_dir))
    params = count_params(loaded.model)
    recipe = Recipe.from_list(BEFORE.get(method, []) + [{"method": method, **QUICK.get(method, {})}]
                              + AFTER.get(method, []))
    apply_recipe(loaded.model, recipe, calibration(seed), batch_size=4)
    artifact.save(loaded.model, loaded.tokenizer, out, recipe=recipe.to_list(), original_params=params)
    return loaded.model


def test_registry_lists_the_built_in_methods():
    assert {"rtn", "svd", "gptq"} <= set(METHODS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, arch, model_dirs, tokens, tmp_path):
    if arch not in ARCH_ONLY.get(method, {arch}):
        with pytest.raises(UserError, match=REFUSALS[method]):
            compressed_artifact(model_dirs[arch], method, tmp_path / "a")
        assert not (tmp_path / "a").exists()
        return
    dense = load_model(str(model_dirs[arch])).model
    dense_bits = artifact.storage_bits(dense)
    model = compressed_artifact(model_dirs[arch], method, tmp_path / "a")
    if method not in STRUCTURAL:
        assert any(isinstance(m, CompressedModule) for m in model.modules())

    logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    assert artifact.storage_bits(model) < dense_bits

    reloaded, _ = artifact.load(tmp_path / "a", fast=False)  # the stored tensors, exactly
    assert torch.equal(reloaded(tokens).logits, logits)
    fast, _ = artifact.load(tmp_path / "a")  # each module on its CPU kernel: float rounding apart
    assert torch.allclose(fast(tokens).logits, logits, rtol=0, atol=1e-4 * logits.abs().max().item())

    compressed_artifact(model_dirs[arch], method, tmp_path / "b")
    for file in sorted((tmp_path / "a").iterdir()):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips(method):
    entry = get_method(method)
    config = entry.config_cls()
    assert entry.config_cls.from_dict(copy.deepcopy(config.to_dict())) == config
    recipe = Recipe.single(method)
    assert Recipe.from_list(recipe.to_list()).to_list() == recipe.to_list()
