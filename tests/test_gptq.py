"""GPTQ: the blocked Cholesky solver against the slow OBQ-order reference, and its objective."""

import pytest
import torch

from hypercompress.layers.quant_linear import dequantize, fit_grid, quantize_to_grid
from hypercompress.methods.gptq_solver import gptq_reference, gptq_solve


def problem(rows=24, cols=96, n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, n, generator=generator) * torch.linspace(0.1, 3, cols)[:, None]
    X[7] = 0  # a dead input column
    H = 2 * X.double() @ X.double().T / n
    return torch.randn(rows, cols, generator=generator), H, X


def layer_error(Q, W, X):
    return ((Q - W).double() @ X.double()).pow(2).sum().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric, zero_point", [(False, "int"), (True, "int"), (False, "float")])
@pytest.mark.parametrize("bits, group", [(3, 32), (4, 96), (2, 16)])
def test_blocked_solver_matches_reference(act_order, symmetric, zero_point, bits, group):
    W, H, _ = problem()
    fast = gptq_solve(W, H, bits, group, symmetric, zero_point, act_order, block_size=32)
    slow = gptq_reference(W, H, bits, group, symmetric, zero_point, act_order)
    assert (fast[0] != slow[0]).float().mean() < 0.002
    assert torch.allclose(fast[1], slow[1], rtol=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_layer_objective(act_order):
    W, H, X = problem(seed=1)
    codes, scale, zero = gptq_solve(W, H, 3, 32, act_order=act_order)
    Q = dequantize(codes, scale, zero, "int").reshape(W.shape)
    groups = W.reshape(W.shape[0], -1, 32)
    s, z = fit_grid(groups, 3, False, "int")
    R = dequantize(quantize_to_grid(groups, s, z, 3, "int"), s, z, "int").reshape(W.shape)
    assert layer_error(Q, W, X) < 0.95 * layer_error(R, W, X)


def test_codes_lie_on_the_grid_and_groups_are_respected():
    W, H, _ = problem()
    codes, scale, zero = gptq_solve(W, H, 3, 32)
    assert codes.shape == (24, 3, 32) and scale.shape == zero.shape == (24, 3, 1)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 7


@pytest.mark.parametrize("symmetric, zero_point", [(False, "int"), (True, "int"), (False, "float")])
def test_shared_pass_gives_each_part_what_its_own_solve_gives(symmetric, zero_point):
    """Linears fed one input, each at options of its own, solved in one pass against their Hessian."""
    from hypercompress.methods.gptq_solver import gptq_solve_shared

    W, H, _ = problem()
    other = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    parts = [(W, 3, 32), (W, 2, 96), (other, 4, 16), (other, 3, 32)]
    shared = gptq_solve_shared(parts, H, symmetric, zero_point)
    for (weight, bits, group), (codes, scale, zero) in zip(parts, shared):
        alone = gptq_solve(weight, H, bits, group, symmetric, zero_point, act_order=True)
        assert codes.shape == alone[0].shape and scale.shape == alone[1].shape
        assert (codes != alone[0]).float().mean() < 0.002
        assert torch.equal(scale, alone[1]) and torch.equal(zero, alone[2])


def test_a_planned_recipe_solves_linears_fed_one_input_together_as_one_by_one():
    """A recipe whose per-option GPTQ stages split q/k/v and gate/up: the pass that solves them
    together writes the codes the one-by-one pass writes."""
    import copy

    from hypercompress.apply import StageRouter, apply_recipe
    from hypercompress.layers.quant_linear import QuantLinear
    from hypercompress.methods.base import LayerwiseMethod
    from hypercompress.recipe import Recipe

    from conftest import make_model

    model = make_model("llama")
    recipe = Recipe.from_list([
        {"method": "gptq", "bits": 3, "group_size": 32, "targets": [r"q_proj$", r"up_proj$"]},
        {"method": "gptq", "bits": 4, "group_size": -1, "targets": [r"[kv]_proj$", r"gate_proj$", r"o_proj$"]},
        {"method": "gptq", "bits": 2, "group_size": 64, "targets": [r"down_proj$"]}], where="test")
    samples = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    together = copy.deepcopy(model)
    apply_recipe(together, recipe, samples)
    calls = []
    original = StageRouter.compress_many

    def one_by_one(self, names, layer_of):
        calls.append(len(names))
        return LayerwiseMethod.compress_many(self, names, layer_of)

    try:
        StageRouter.compress_many = one_by_one
        alone = copy.deepcopy(model)
        apply_recipe(alone, recipe, samples)
    finally:
        StageRouter.compress_many = original
    assert calls == [7, 7]  # the patched pass was the one-by-one path, a block at a time
    quantized = {n: m for n, m in together.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14
    for name, module in alone.named_modules():
        if isinstance(module, QuantLinear):
            assert module.bits == quantized[name].bits and module.group_size == quantized[name].group_size
            assert (module.qweight != quantized[name].qweight).float().mean() < 0.01, name
            assert torch.equal(module.scales, quantized[name].scales), name
