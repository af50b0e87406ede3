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
