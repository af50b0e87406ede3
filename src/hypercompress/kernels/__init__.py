"""Fast inference paths for stored module kinds: torch's own kernels, and ours in Triton where no
library reads our codes (triton_quant.py).

Every compressed module keeps its reference forward (dequantize, obviously right). `prepare_model`
asks each one, once the model sits on its device in its compute dtype, for the fastest exact path
that device has (`CompressedModule.prepare_fast`), and returns which backend each module took:

| stored kind | CUDA | CPU |
|---|---|---|
| quant, 2..4 bits, groups of 32..256 (or a multiple) / rows | bfloat16: int4 tinygemm (`_weight_int4pack_mm`) up to 32 tokens, else dequantize + GEMM; ours (Triton, `triton_quant.py`, 1..8 bits over the stored codes) instead where the GPU family's tuned table measured ours faster summed over 1, 4 and 16 tokens (`triton_preferred`: a preference needs a run that also checked the kernels' output on that GPU; the H100 prefers ours for 2- and 4-bit codes on 7B-sized layers); float32: dense, dequantized once | bfloat16/float16: int4 (`_weight_int4pack_mm_for_cpu`) up to 256 tokens, else dequantize + GEMM; float32: the same kernel in bfloat16 (x cast, the result cast back) up to 8 tokens, else a float32 GEMM on the weight dequantized once (kept beside the codes) |
| quant, 8 bits symmetric, one scale per row | dense, dequantized once (the int8 op is 15x slower than dense there); ours where tuned and faster | int8 weight-only (`_weight_int8pack_mm`) up to 64 tokens, else dequantize + GEMM |
| quant, other (5..8 bits grouped, shapes the kernels refuse) | dense, dequantized once; ours where tuned and faster | dense, dequantized once |
| sparse 2:4 | dense, dequantized once; workload "prefill": semi-structured (`torch.sparse`, cuSPARSELt / CUTLASS) | dense, dequantized once |
| sparse, unstructured | dense, dequantized once | dense, dequantized once |
| lowrank | two GEMMs (factors cast once), one GEMM when r (in + out) >= in x out | same |
| tied head over a quantized embedding | as quant | as quant |
| generated (hypernet), kan | dense: generated once at load, cast once | same |

`load` and `prepare` also route plain greedy `generate` calls through our loop (greedy.py: on CUDA a static KV
cache and each step one CUDA graph replay) and the rest, on CUDA, through transformers' compiled static step (decode.py).

Codes convert exactly: ours compute (q - z) s in float32 rounded once; tinygemm computes W = (q - 8) s + z_t per group, so our grids map as
(q - z) s = (q - 8) s + (8 - z) s (int zero), (q - 2^(b-1)) s = (q - 8) s + (8 - 2^(b-1)) s
(symmetric), q s + m = (q - 8) s + (8 s + m) (float zero); codes of 2 or 3 bits are valid 4-bit
codes. The only difference from the reference is the rounding of s and z_t to the compute dtype
(and, for a CPU float32 caller's calls of up to 8 tokens, of x and the result to bfloat16).
"""

from __future__ import annotations

import torch
from torch import nn


WORKLOADS = ("decode", "prefill")


def prepare_model(model: nn.Module, dtype: torch.dtype, workload: str = "decode") -> dict[str, str]:
    """Choose every compressed module's fast path for the device it now sits on and `dtype`, the
    compute dtype of the activations it will see.

    `workload`: "decode" (serving: few tokens per call) or "prefill" (long inputs: 2:4 sparse
    layers then take the semi-structured kernel, slower than dense at decode). Call after
    `model.to(device)`. Returns {module name: backend description}. A module called
    with inputs on another device or of another dtype falls back to its reference forward (slow,
    never wrong).
    """
    from ..layers.base import CompressedModule

    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r}: one of {WORKLOADS}")
    backends = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule):
            backends[name] = module.prepare_fast(dtype, workload)
            if module._fast is not None:
                module._fast.mark_static()
    return backends


def prepare(model: nn.Module, dtype: torch.dtype | None = None, workload: str = "decode") -> dict[str, str]:
    """Give every compressed module of `model` (as it now sits: call after `model.to(device)`) the
    fastest exact kernel its device has for activations of `dtype` (default: the dtype of the
    model's first floating-point parameter); `workload` "decode" or "prefill" (kernels.prepare_model).
    `generate` then decodes as `load` sets it up (decode.use_fast_decode). Returns {module name:
    backend}, also kept as `model.hypercompress_backends`."""
    from .decode import use_fast_decode

    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    model.hypercompress_backends = prepare_model(model, dtype, workload)
    use_fast_decode(model)
    return model.hypercompress_backends
