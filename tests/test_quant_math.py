"""RTN against a slow, obvious reference; grid invariants; SVD maths."""

import pytest
import torch
from torch import nn

from hypercompress.layers.quant_linear import QuantLinear
from hypercompress.methods.rtn import RTN, RtnConfig
from hypercompress.linalg import truncated_svd
from hypercompress.methods.svd import SVD, SvdConfig, rank_for


def reference_rtn(weight, bits, group, symmetric):
    """Per-group min-max round-to-nearest, one group at a time (the textbook definition)."""
    maxq = 2 ** bits - 1
    out = torch.empty_like(weight)
    for r in range(weight.shape[0]):
        for c in range(0, weight.shape[1], group):
            w = weight[r, c: c + group]
            if symmetric:
                scale = float(torch.tensor(2 * w.abs().max().item() / maxq).half())
                zero = 2 ** (bits - 1)
            else:
                lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
                scale = float(torch.tensor((hi - lo) / maxq).half())
                zero = min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            out[r, c: c + group] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_matches_reference(bits, symmetric):
    torch.manual_seed(bits)
    layer = nn.Linear(64, 8, bias=True)
    q = RTN(RtnConfig(bits=bits, group_size=32, symmetric=symmetric)).compress("x", layer)
    expected = reference_rtn(layer.weight.detach(), bits, 32, symmetric)
    assert torch.allclose(q.dense_weight(), expected, atol=1e-6)
    assert torch.allclose(q.bias.float(), layer.bias.detach().half().float())


def test_rtn_storage_is_exact():
    layer = nn.Linear(128, 16, bias=False)
    q = RTN(RtnConfig(bits=3, group_size=64)).compress("x", layer)
    # 16*128 3-bit codes + 16*2 fp16 scales + 16*2 3-bit zeros (packed)
    assert q.storage_bits() == (16 * 128 * 3 + 7) // 8 * 8 + 16 * 2 * 16 + (32 * 3 + 7) // 8 * 8


def test_float_zero_point_is_lossless_on_a_grid():
    """A weight that already lies on a 4-bit grid with float minimum (GGUF Q4_1) is kept exactly."""
    torch.manual_seed(0)
    scale = (torch.rand(8, 2, 1) * 0.1 + 0.01).half().float()
    low = (torch.randn(8, 2, 1) * 0.1).half().float()
    codes = torch.randint(0, 16, (8, 2, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    weight = (codes * scale + low).reshape(8, 64)
    layer = nn.Linear(64, 8, bias=False)
    layer.weight.data.copy_(weight)
    q = RTN(RtnConfig(bits=4, group_size=32, zero_point="float")).compress("x", layer)
    # exact up to the float16 rounding of the refitted scale: 15 codes x 0.11 x 2^-11
    assert (q.dense_weight() - weight).abs().max() < 1e-3
    rtn_int = RTN(RtnConfig(bits=4, group_size=32)).compress("x", layer)
    assert (rtn_int.dense_weight() - weight).abs().max() > 1e-3


def test_error_falls_with_bits():
    torch.manual_seed(0)
    layer = nn.Linear(128, 32)
    errors = [(RTN(RtnConfig(bits=b)).compress("x", layer).dense_weight() - layer.weight).norm()
              for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_quantized_forward_equals_dense_forward():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16, bias=True)
    q = RTN(RtnConfig(bits=5, group_size=-1)).compress("x", layer)
    assert isinstance(q, QuantLinear) and q.group_size == 64
    x = torch.randn(3, 64)
    dense = x @ q.dense_weight().T + q.bias.float()
    assert torch.allclose(q(x), dense, atol=1e-5)


def test_svd_recovers_a_low_rank_matrix_exactly():
    torch.manual_seed(0)
    weight = torch.randn(40, 3) @ torch.randn(3, 30)
    U, V = truncated_svd(weight, 3)
    assert U.shape == (40, 3) and V.shape == (3, 30)
    assert torch.allclose(U @ V, weight, atol=1e-4)


def test_svd_is_the_best_rank_r_fit():
    torch.manual_seed(0)
    weight = torch.randn(30, 20)
    s = torch.linalg.svdvals(weight.double())
    U, V = truncated_svd(weight, 5)
    error = (weight.double() - (U @ V).double()).norm()
    assert torch.isclose(error, s[5:].norm(), rtol=1e-4)


def test_rank_for_respects_the_kept_fraction():
    for out_f, in_f, keep in [(1536, 576, 0.5), (576, 576, 0.3), (64, 256, 0.8)]:
        r = rank_for(out_f, in_f, SvdConfig(keep=keep))
        assert r * (out_f + in_f) <= keep * out_f * in_f < (r + 1) * (out_f + in_f)
    assert rank_for(64, 32, SvdConfig(rank=1000)) == 32


def test_svd_layer_forward_matches_its_weight():
    torch.manual_seed(0)
    layer = nn.Linear(32, 48, bias=True)
    low = SVD(SvdConfig(rank=4)).compress("x", layer)
    x = torch.randn(5, 32)
    assert torch.allclose(low(x), x @ low.dense_weight().T + low.bias.float(), atol=1e-4)
