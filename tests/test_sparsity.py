"""Wanda and SparseGPT: mask invariants, storage, the OBS reference, and the layer objective."""

import pytest
import torch
from torch import nn

from hypercompress.layers.sparse_linear import SparseLinear
from hypercompress.methods.damping import add_damping
from hypercompress.methods.gptq_solver import _prepare
from hypercompress.methods.sparsegpt import SparseGPT, SparseGptConfig
from hypercompress.methods.sparsegpt_solver import sparsegpt_solve
from hypercompress.methods.sparsity import SparsityConfig, keep_mask
from hypercompress.methods.wanda import Wanda

from test_gptq import layer_error, problem


def test_n_m_masks_keep_exactly_n_of_every_m():
    score = torch.randn(16, 64)
    keep = keep_mask(score, 0.5, (2, 4))
    assert torch.equal(keep.view(16, 16, 4).sum(-1), torch.full((16, 16), 2))
    top = torch.topk(score.view(16, 16, 4), 2, dim=-1).values.min(-1).values
    assert torch.all(score.view(16, 16, 4)[keep.view(16, 16, 4)].view(16, 16, 2).min(-1).values >= top)


def test_unstructured_masks_prune_each_row_equally():
    keep = keep_mask(torch.randn(8, 100), 0.3, None)
    assert torch.equal(keep.sum(1), torch.full((8,), 70))


def test_sparse_linear_storage_and_round_trip():
    weight = torch.randn(8, 64)
    keep = keep_mask(weight.abs(), 0.5, (2, 4))
    layer = SparseLinear.from_dense(weight, keep, None)
    assert torch.equal(layer.dense_weight(), (weight * keep).half().float())
    assert layer.storage_bits() == 8 * 64 + 8 * 32 * 16  # 1-bit mask + fp16 kept values


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_final_weights_match_the_obs_reference(n_m):
    """With the mask the solver chose, the explicit OBS update (remove one column at a time from
    H_F^-1) gives the same final weights."""
    W, H, _ = problem()
    fast, keep, *_ = sparsegpt_solve(W, H, 0.5, n_m, block_size=32)
    Wr, Hr, _ = _prepare(W, H, act_order=False)
    Wr, Hinv = Wr.double(), torch.linalg.inv(add_damping(Hr, 0.01))
    for col in range(W.shape[1]):
        q = Wr[:, col: col + 1] * keep[:, col: col + 1]
        err = (Wr[:, col: col + 1] - q) / Hinv[col, col]
        Wr -= err * Hinv[col: col + 1, :]
        Wr[:, col: col + 1] = q
        Hinv -= Hinv[:, col: col + 1] @ Hinv[col: col + 1, :] / Hinv[col, col]
    assert torch.allclose(fast.double(), Wr, atol=1e-3)
    assert (fast[~keep] == 0).all()


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_beats_wanda_on_the_layer_objective(n_m):
    W, H, X = problem(seed=2)
    pruned, keep, *_ = sparsegpt_solve(W, H, 0.5, n_m)
    assert (1 - keep.float().mean()).item() == pytest.approx(0.5, abs=0.01)
    wanda_keep = keep_mask(W.abs() * (X.pow(2).sum(1).sqrt())[None], 0.5, n_m)
    assert layer_error(pruned, W, X) < layer_error(W * wanda_keep, W, X)


def test_joint_sparse_quantization_stores_codes_for_kept_weights_only():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16, bias=True)
    method = SparseGPT(SparseGptConfig(sparsity=0.5, pattern="2:4", bits=4, group_size=32))
    method.observe("x", torch.randn(50, 64))
    sparse = method.compress("x", layer)
    weight = sparse.dense_weight()
    assert torch.equal((weight != 0).view(16, 16, 4).sum(-1) <= 2, torch.ones(16, 16, dtype=torch.bool))
    assert sparse.qvalues.numel() == 16 * 32 * 4 // 8
    x = torch.randn(3, 64)
    assert torch.allclose(sparse(x), x @ weight.T + sparse.bias.float(), atol=1e-5)


def test_wanda_uses_input_norms():
    """A column with large inputs survives even with small weights."""
    layer = nn.Linear(4, 1, bias=False)
    layer.weight.data = torch.tensor([[0.1, 1.0, 1.0, 1.0]])
    method = Wanda(SparsityConfig(sparsity=0.25))
    method.observe("x", torch.tensor([[100.0, 1.0, 1.0, 0.5]]))
    assert SparseLinear.keep_mask(method.compress("x", layer)).tolist() == [[True, True, True, False]]
