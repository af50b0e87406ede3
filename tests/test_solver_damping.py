"""Hessian solvers on singular Hessians: more damping (logged) or a one-line error naming the layer;
damp <= 0 refused by every solver's config check."""

from __future__ import annotations

import logging

import pytest
import torch

from hypercompress.errors import UserError
from hypercompress.methods.asvd import AsvdConfig, cholesky_whitening
from hypercompress.methods.gptq import GptqConfig
from hypercompress.methods.gptq_solver import gptq_solve
from hypercompress.methods.kv_lowrank import KvLowRankConfig
from hypercompress.methods.sparsegpt import SparseGptConfig
from hypercompress.methods.sparsegpt_solver import sparsegpt_solve

from test_cli import assert_one_line_error, run


def singular_hessian(cols: int = 32, tokens: int = 8) -> torch.Tensor:
    """H = 2 X^T X / n from fewer tokens than columns, two columns equal: exactly singular."""
    X = torch.randint(-3, 4, (tokens, cols), generator=torch.Generator().manual_seed(0)).double()
    X[:, 1] = X[:, 0]
    return 2 * X.T @ X / tokens


SOLVERS = {
    "gptq": lambda W, H, damp: gptq_solve(W, H, 4, 32, damp=damp, layer="blocks.0.q")[0],
    "sparsegpt": lambda W, H, damp: sparsegpt_solve(W, H, 0.5, damp=damp, layer="blocks.0.q")[0],
    "asvd": lambda W, H, damp: cholesky_whitening(H / 2, damp, "blocks.0.q")[0],
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_singular_hessian_is_solved_with_more_damping(solver, caplog):
    H = singular_hessian()
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="hypercompress"):
        result = SOLVERS[solver](W, H, 0.0)
    assert torch.isfinite(result).all()
    assert "blocks.0.q" in caplog.text and "damp 0.0001" in caplog.text


@pytest.mark.parametrize("solver", SOLVERS)
def test_hessian_no_damping_can_fix_names_the_layer(solver):
    H = singular_hessian()
    H[3, 3] = float("nan")
    with pytest.raises(UserError, match="blocks.0.q"):
        SOLVERS[solver](torch.randn(16, 32), H, 0.01)


@pytest.mark.parametrize("config", [GptqConfig, SparseGptConfig, AsvdConfig, KvLowRankConfig])
@pytest.mark.parametrize("damp", [0, -0.1, 1])
def test_damp_out_of_range_is_refused(config, damp):
    with pytest.raises(UserError, match=f"damp={float(damp)}"):
        config.from_dict({"damp": damp})


def test_cli_refuses_damp_zero(model_dirs, calib_file, tmp_path):
    result = run("compress", model_dirs["llama"], "--method", "gptq", "--set", "damp=0", "--calib", calib_file,
                 "--out", tmp_path / "out")
    assert_one_line_error(result, "damp=0.0", "(0, 1)")
    assert list(tmp_path.iterdir()) == []
