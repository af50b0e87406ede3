"""Runs our Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) over a grid of
stored layouts and prints one JSON line per case: its relative error against the reference forward.

Run by tests/test_triton_kernels.py in a subprocess (the interpreter is chosen when the kernels are
defined, so it needs a fresh process). The interpreter computes bfloat16 `tl.dot` wrongly (NumPy has
no bfloat16), so the tensor-core cases run in float16 here and in bfloat16 on the GPU (tests marked
cuda).
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from hypercompress.kernels import triton_quant as tq  # noqa: E402
from hypercompress.layers import QuantLinear  # noqa: E402

FMA = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "USE_DOT": False, "INTERLEAVE": False, "GROUPSUM": False,
       "num_warps": 4, "num_stages": 1}
DOT = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "USE_DOT": True, "INTERLEAVE": False, "GROUPSUM": False,
       "num_warps": 4, "num_stages": 1}
FMA_IL, DOT_IL = {**FMA, "INTERLEAVE": True}, {**DOT, "INTERLEAVE": True}
FMA_SUM = {**FMA_IL, "GROUPSUM": True}
# (dtype, config, split-K, rows): every path
PATHS = [(torch.bfloat16, FMA, 1, 1), (torch.bfloat16, FMA, 3, 2), (torch.bfloat16, FMA_IL, 2, 1),
         (torch.bfloat16, FMA_SUM, 3, 2), (torch.float16, DOT, 2, 5), (torch.float16, DOT, 1, 17),
         (torch.float16, DOT_IL, 2, 17)]


def path_name(config: dict) -> str:
    name = "dot" if config["USE_DOT"] else "fma"
    return name + ("-interleave" if config["INTERLEAVE"] else "") + ("-groupsum" if config["GROUPSUM"] else "")


def layer(bits: int, group: int, out_features: int, in_features: int, zero: str, bias: bool) -> QuantLinear:
    g = torch.Generator().manual_seed(bits * 1000 + group + out_features)
    groups = in_features // group
    codes = torch.randint(0, 1 << bits, (out_features, groups, group), generator=g).float()
    scale = torch.rand(out_features, groups, 1, generator=g) * 0.01 + 1e-3
    if zero == "float":
        point = -torch.rand(out_features, groups, 1, generator=g) * 0.05
    else:
        point = torch.randint(0, 1 << bits, (out_features, groups, 1), generator=g).float()
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantLinear.from_codes(codes, scale, point, b, bits, zero == "symmetric", "float" if zero == "float" else "int")


def main() -> None:
    cases = [  # bits, group, out, in, zero kind, bias
        (2, 32, 40, 96, "int", False), (2, 64, 24, 128, "symmetric", True), (2, 128, 17, 128, "float", False),
        (3, 32, 33, 96, "int", True), (3, 64, 24, 128, "symmetric", False), (3, 96, 16, 192, "float", False),
        (3, 128, 24, 256, "int", False),
        (4, 32, 40, 64, "int", False), (4, 128, 19, 256, "symmetric", False), (4, 64, 24, 128, "float", True),
        (8, 32, 24, 64, "int", False), (8, 64, 16, 128, "symmetric", True), (5, 32, 16, 64, "float", False),
        (1, 128, 16, 256, "symmetric", False), (6, 32, 16, 64, "int", True), (7, 128, 16, 128, "float", False),
    ]
    for bits, group, out_features, in_features, zero, bias in cases:
        module = layer(bits, group, out_features, in_features, zero, bias)
        weight = module.dense_weight(torch.float32)
        zeros, kind = module.triton_zeros()
        for dtype, config, split, rows in PATHS:
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
            reference = x.float() @ weight.t() + (module.bias.float() if bias else 0)
            b = module.bias.to(dtype) if bias else None
            y = tq.quant_matmul(x, module.qweight, module.scales, zeros, b, bits, kind, group, out_features,
                                {**config, "SPLIT_K": split})
            error = float((y.float() - reference).abs().max() / reference.abs().max())
            print(json.dumps({"case": f"w{bits} g{group} {zero} {out_features}x{in_features} {str(dtype)[6:]} "
                              f"{path_name(config)} split{split} rows{rows}",
                              "error": error, "shape": list(y.shape), "dtype": str(y.dtype)}), flush=True)
        out = torch.empty(out_features * in_features + 7)
        dense = tq.dequantize_weight(module.qweight, module.scales, zeros, bits, kind, group,
                                     out_features, in_features, out)
        error = float((dense - weight).abs().max() / weight.abs().max())
        print(json.dumps({"case": f"dequantize w{bits} g{group} {zero}", "error": error,
                          "shape": list(dense.shape), "dtype": str(dense.dtype)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
