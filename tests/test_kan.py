"""The KAN hierarchical compressor: splines, levels, the state-dict API and the registered method."""

from __future__ import annotations

import pytest
import torch

from hypercompress.methods.kan import HierarchicalCompressor, decompress_weights
from hypercompress.layers.kan import evaluate
from hypercompress.layers.kan.spline import KANLayer, bspline_basis
from hypercompress.methods.kan.compressor import fit_levels
from hypercompress.sources.models import load_model


def test_bspline_bases_partition_unity_inside_the_grid():
    layer = KANLayer(1, 1, grid=5, order=3)
    x = torch.linspace(-0.99, 0.99, 50)[:, None]
    bases = bspline_basis(x, layer.knots, 3)
    assert bases.shape == (50, 1, 8)
    assert torch.allclose(bases.sum(-1), torch.ones(50, 1), atol=1e-5)
    assert (bases >= 0).all()


def test_levels_refine_coarse_to_fine():
    torch.manual_seed(0)
    weight = torch.randn(48, 8) @ torch.randn(8, 40) / 8 + 0.05 * torch.randn(48, 40)
    levels = fit_levels(weight, 3, (8,), 4, 3, 60, 2e-2, 0, batch=1024)
    errors = [(evaluate(levels[: n + 1]) - weight).pow(2).mean().item() for n in range(3)]
    assert errors[0] < weight.pow(2).mean().item()  # level 1 explains part of the matrix
    assert errors[2] < errors[1] < errors[0]        # each next level fits what is left
    assert [f.kan.layers[0].grid for f in levels] == [3, 6, 12]
    assert all(p.dtype == torch.float16 for p in levels.parameters())  # stored precision


def test_matrices_fitted_together_are_each_their_own_fit():
    torch.manual_seed(0)
    weights = torch.randn(3, 32, 4) @ torch.randn(3, 4, 24) / 4
    weights[1] *= 10  # a different scale per matrix: each copy has its own codes and scale
    levels = fit_levels(weights, 2, (8,), 4, 3, 80, 2e-2, 0, batch=512)
    assert levels[0].copies == 3
    made = evaluate(levels)
    for m in range(3):
        error = (made[m] - weights[m]).pow(2).mean() / weights[m].pow(2).mean()
        assert error < 0.2
        alone = evaluate([field.select(m) for field in levels])[0]
        assert torch.allclose(alone, made[m], atol=1e-5)  # a selected copy computes its slice


def test_state_dict_api_round_trips_into_load_state_dict(model_dirs, tokens):
    model = load_model(str(model_dirs["llama"])).model
    state = model.state_dict()
    compressor = HierarchicalCompressor(num_levels=2, hidden_dims=(4, 4), steps=5, min_size=4096)
    compressed = compressor.compress(state)
    kinds = {n: e["kind"] for n, e in compressed["tensors"].items()}
    assert kinds["model.layers.0.mlp.up_proj.weight"] == "kan" and kinds["model.norm.weight"] == "dense"
    restored = decompress_weights(compressed)
    assert set(restored) == set(state) and all(restored[n].shape == state[n].shape for n in state)
    model.load_state_dict(restored)
    assert torch.isfinite(model(tokens).logits).all()
    assert torch.equal(decompress_weights(compressed)["model.layers.0.mlp.up_proj.weight"],
                       restored["model.layers.0.mlp.up_proj.weight"])  # deterministic decompression
    with pytest.raises(ValueError, match="KAN-compressed"):
        decompress_weights({"tensors": {}})


def test_the_runs_device_reaches_kan(model_dirs, monkeypatch):
    """`--device` reaches kan's fits (it kept its own device, default cpu); a stage's own device wins."""
    from hypercompress.apply import apply_recipe
    from hypercompress.errors import UserError
    from hypercompress.recipe import Recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = load_model(str(model_dirs["llama"])).model
    with pytest.raises(UserError, match="kan device=cuda: no CUDA device"):
        apply_recipe(model, Recipe.from_list([{"method": "kan", "steps": 1}]), device="cuda")
    report = apply_recipe(model, Recipe.from_list([{"method": "kan", "steps": 1, "device": "cpu"}]), device="cuda")
    assert report["stages"][0]["modules"] == 14
