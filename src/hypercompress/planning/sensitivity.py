"""Per-module sensitivity of a model to quantization, measured end to end (the planner's losses).

Each module alone is round-to-nearest quantized in place with an anchor option and the mean
KL(dense || quantized) of the model's next-token distributions on calibration windows is measured
(HAWQ-style per-layer sensitivity, measured end to end). The other options (bits, group size; group
-1 = one scale per row) of a block linear are scaled from it by their output error on the same data,
KL(o) = KL(anchor) * tr(dW_o H dW_o^T) / tr(dW_anchor H dW_anchor^T) with H = X^T X of the layer's
inputs: the second-order picture in which KL grows linearly with the output perturbation energy,
with a module-specific factor. One forward per module instead of one per option (7x fewer on CPU);
the embedding, whose error reaches both the input and the tied head, gets every option measured.
`joint_kl` measures a whole plan at once (errors compound beyond the sum of single-module KLs).
Everything runs where the runner's samples are (`device`), in the probe model's dtype.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import arch_of
from ..block_calls import capture_block_inputs
from ..layers.quant_linear import dequantize, fit_grid, quantize_to_grid, resolve_group_size
from ..layers.base import Conv1D, linear_weight
from ..modules import head_logits

Option = tuple[int, int]  # (bits, group size); group -1: one group per row


class TailRunner:
    """Log-probs of the model from the input of block i onward, reusing cached block inputs, so a
    change inside block i costs only blocks i..L-1 and the head (about half a forward on average)."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, batch: int, observe: tuple[str, ...] = ()):
        spec = arch_of(model.config.model_type)
        self.model, self.samples, self.batch = model, samples, batch
        self.blocks = model.get_submodule(spec.blocks)
        self.norm = model.get_submodule(spec.final_norm)
        self.prefix = f"{spec.blocks}."
        hiddens, calls = capture_block_inputs(model, samples, batch)  # each block's own mask
        self.calls = calls.to(samples.device)  # captured on the CPU; the blocks run where the samples are
        self.inputs = [hiddens]  # inputs[i][batch]: the dense model's input of block i
        self.gram: dict[str, torch.Tensor] = {}  # X^T X of each observed linear's inputs (float32)
        hooks = [model.get_submodule(n).register_forward_hook(self._observer(n)) for n in observe]
        for index, block in enumerate(self.blocks):
            self.inputs.append([self.calls.run(block, index, batch, h)
                                for batch, h in enumerate(self.inputs[-1])])
        for hook in hooks:
            hook.remove()
        self.reference = self.log_probs()
        self.reference_probs = [r.exp() for r in self.reference]  # every KL reads them: taken once

    def _observer(self, name: str):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            self.gram[name] = self.gram.get(name, 0) + x.t() @ x
        return hook

    def log_probs(self, module_name: str | None = None) -> list[torch.Tensor]:
        start = 0
        if module_name and module_name.startswith(self.prefix):
            start = int(module_name[len(self.prefix):].split(".")[0])
        elif module_name is not None:  # the embedding (or anything before block 0): a full pass
            return [F.log_softmax(self.model(input_ids=b, use_cache=False).logits.float(), -1)
                    for b in self.samples.split(self.batch)]
        out = []
        for batch, hidden in enumerate(self.inputs[start]):
            for index in range(start, len(self.blocks)):
                hidden = self.calls.run(self.blocks[index], index, batch, hidden)
            out.append(F.log_softmax(head_logits(self.model, self.norm(hidden)).float(), -1))
        return out


@torch.no_grad()
def measure_sensitivity(model: nn.Module, candidates: dict[str, tuple[Option, ...]],
                        samples: torch.Tensor, batch: int = 4,
                        progress: Callable[[int, int], None] | None = None, exact: bool = False,
                        runner: "TailRunner | None" = None) -> dict[str, dict[Option, float]]:
    """KL(dense || model with only `name` RTN-quantized with an option) per module and option,
    mean over the predicted positions of `samples` (N, L). Block linears: measured at the anchor
    option (3-bit rows where offered) and scaled to the others by output error (module docstring);
    `exact` measures every option of every module instead."""
    runner = runner or TailRunner(model, samples, batch, observe=block_modules(model, candidates))
    positions = samples.shape[0] * samples.shape[1]
    result: dict[str, dict[Option, float]] = {}
    measured = {n: (opts if exact or n not in runner.gram else (_anchor(opts),)) for n, opts in candidates.items()}
    total, done = sum(len(o) for o in measured.values()), 0
    for name, options in measured.items():
        layer = model.get_submodule(name)
        transposed = Conv1D and isinstance(layer, Conv1D)
        original = layer.weight.data.clone()
        weight = linear_weight(layer)
        result[name] = {}
        for option in options:
            quantized = _rtn_weight(weight, *option).to(original.dtype)
            layer.weight.data.copy_(quantized.t() if transposed else quantized)
            result[name][option] = _kl(runner, runner.log_probs(name), positions)
            layer.weight.data.copy_(original)
            done += 1
            if progress:
                progress(done, total)
        if len(options) < len(candidates[name]):
            anchor = options[0]
            error = {o: _output_error(weight, runner.gram[name], o) for o in candidates[name]}
            per_error = result[name][anchor] / max(error[anchor], 1e-30)
            result[name] = {o: per_error * error[o] for o in candidates[name]}
    return result


def block_modules(model: nn.Module, names) -> tuple[str, ...]:
    prefix = f"{arch_of(model.config.model_type).blocks}."
    return tuple(n for n in names if n.startswith(prefix))


def _kl(runner: TailRunner, log_probs: list[torch.Tensor], positions: int) -> float:
    """Mean KL(the runner's reference || log_probs) over `positions`, clamped at 0 (rounding noise)."""
    kl = sum((p * (r - s)).sum(-1).sum().item()
             for p, r, s in zip(runner.reference_probs, runner.reference, log_probs))
    return max(kl / positions, 0.0)


@torch.no_grad()
def joint_kl(model: nn.Module, runner: "TailRunner", allocation: dict[str, Option]) -> float:
    """Measured KL of the whole plan: every module RTN-quantized with its option at once (one forward)."""
    originals = {}
    for name, option in allocation.items():
        layer = model.get_submodule(name)
        originals[name] = layer.weight.data.clone()
        quantized = _rtn_weight(linear_weight(layer), *option).to(layer.weight.dtype)
        layer.weight.data.copy_(quantized.t() if Conv1D and isinstance(layer, Conv1D) else quantized)
    first = min(allocation, key=lambda n: (n.startswith(runner.prefix), n))  # anything before block 0 first
    kl = _kl(runner, runner.log_probs(first), runner.samples.numel())
    for name, weight in originals.items():
        model.get_submodule(name).weight.data.copy_(weight)
    return kl


def _anchor(options: tuple[Option, ...]) -> Option:
    """The option measured end to end: 3-bit rows if offered (well above noise, below collapse)."""
    return (3, -1) if (3, -1) in options else sorted(options)[len(options) // 2]


def _output_error(weight: torch.Tensor, gram: torch.Tensor, option: Option) -> float:
    """tr(dW H dW^T): squared output error of RTN with `option` on the observed inputs."""
    delta = _rtn_weight(weight, *option) - weight
    return float(((delta @ gram) * delta).sum())


def _rtn_weight(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """What RTN (asymmetric, integer zero) would store, dequantized: (out, in) -> (out, in)."""
    rows, cols = weight.shape
    group = resolve_group_size("weight", cols, group)
    groups = weight.reshape(rows, cols // group, group)
    scale, zero = fit_grid(groups, bits, False, "int")
    codes = quantize_to_grid(groups, scale, zero, bits, "int")
    return dequantize(codes, scale, zero, "int").reshape(rows, cols)


def fastest_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where this machine multiplies it faster than float32, else float32.

    CPUs differ: with native bf16 (AVX512-BF16, AMX, or AMD Zen 4) bf16 is about 2.6x faster; an
    AVX-512 Xeon without it runs bf16 matmuls about 4x slower than fp32. A 40 ms probe decides.
    """
    a, b = torch.randn(256, 576, device=device), torch.randn(576, 1536, device=device)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        tick = time.perf_counter()
        for _ in range(5):
            x @ y
        seconds[dtype] = time.perf_counter() - tick
    return min(seconds, key=seconds.get)
