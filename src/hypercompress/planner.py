"""Budget planner: mixed bit-widths and group sizes across modules to hit a whole-model bpw target.

1. Sensitivity (measured, not guessed): each module alone is round-to-nearest quantized in place
   with an anchor option and the mean KL(dense || quantized) of the model's next-token distributions
   on calibration windows is measured (HAWQ-style per-layer sensitivity, measured end to end). The
   other options (bits, group size; group -1 = one scale per row) of a block linear are scaled from
   it by their output error on the same data, KL(o) = KL(anchor) * tr(dW_o H dW_o^T) /
   tr(dW_anchor H dW_anchor^T) with H = X^T X of the layer's inputs: the second-order picture in
   which KL grows linearly with the output perturbation energy, with a module-specific factor.
   One forward per module instead of one per option (7x fewer on CPU); the embedding, whose error
   reaches both the input and the tied head, gets every option measured.
2. Allocation: for several floors on the bits allowed (linears and embedding at >= 2, 3, 4), a
   multiple-choice knapsack (one option per module, least summed KL within the budget) solved by
   dynamic programming over the budget's slack (allocate). Costs are exact storage bits of the
   compressed modules (empty modules measured, not formulas). Offering group sizes as well as
   bit-widths lets a 3.0 bpw plan keep 3-bit codes with fewer scales instead of forcing whole
   modules down to 2 bits, where errors compound far beyond the sum of single-module KLs. Because
   of that compounding, each candidate plan's KL is then measured jointly (all modules quantized at
   once, one forward) and the lowest wins.
3. The result is an ordinary recipe: an RTN stage for the embedding (tied heads follow it), then one
   GPTQ stage per option naming its modules, so the plan is saved, shown and reproducible.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .arch import arch_of, block_linear_names
from .calibration import capture_block_inputs
from .errors import UserError
from .layers import QuantEmbedding, QuantLinear
from .layers.quant_linear import dequantize, fit_grid, quantize_to_grid
from .modules import Conv1D, count_params, linear_weight

Option = tuple[int, int]  # (bits, group size); group -1: one group per row
CELLS_PER_MODULE = 128    # resolution of the knapsack over the slack (allocate)


def linear_options(group: int = 64) -> tuple[Option, ...]:
    """Candidate (bits, group) options of a block linear."""
    return ((2, -1), (2, group), (3, -1), (3, group), (4, -1), (4, group), (8, -1))


def embedding_options(group: int = 64) -> tuple[Option, ...]:
    """Candidate options of the token embedding (and a tied lm_head): never below 2 bits per row."""
    return ((2, -1), (3, -1), (3, group), (4, -1), (4, group), (6, -1), (8, -1))


def option_label(option: Option) -> str:
    bits, group = option
    return f"w{bits}{'row' if group == -1 else f'g{group}'}"


@dataclass
class Plan:
    allocation: dict[str, Option]       # module name -> (bits, group)
    sensitivity: dict[str, dict[Option, float]]
    planned_bits: int                   # tensor bits of the whole planned model
    params: int
    joint_kl: float = float("nan")      # measured KL of the chosen plan (all modules RTN at once)
    candidates: dict[str, float] | None = None  # measured joint KL of each candidate plan

    @property
    def bits_per_weight(self) -> float:
        return self.planned_bits / self.params


def _group(in_features: int, group: int) -> int:
    return in_features if group == -1 or in_features % group else group


def _quant_bits(module: nn.Module, option: Option) -> int:
    """Exact storage of `module` quantized with `option` (an empty module of that layout, measured)."""
    weight = module.weight
    out_f, in_f = (weight.shape[1], weight.shape[0]) if Conv1D and isinstance(module, Conv1D) else weight.shape
    bias = getattr(module, "bias", None) is not None
    kind = QuantEmbedding if isinstance(module, nn.Embedding) else QuantLinear
    bits, group = option
    return kind(in_f, out_f, bits, _group(in_f, group), False, "int", bias).storage_bits()


class _TailRunner:
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
            out.append(F.log_softmax(self.model.get_output_embeddings()(self.norm(hidden)).float(), -1))
        return out


@torch.no_grad()
def measure_sensitivity(model: nn.Module, candidates: dict[str, tuple[Option, ...]],
                        samples: torch.Tensor, batch: int = 4,
                        progress: Callable[[int, int], None] | None = None, exact: bool = False,
                        runner: "_TailRunner | None" = None) -> dict[str, dict[Option, float]]:
    """KL(dense || model with only `name` RTN-quantized with an option) per module and option,
    mean over the predicted positions of `samples` (N, L). Block linears: measured at the anchor
    option (3-bit rows where offered) and scaled to the others by output error (module docstring);
    `exact` measures every option of every module instead."""
    runner = runner or _TailRunner(model, samples, batch, observe=_block_modules(model, candidates))
    reference = runner.reference
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
            result[name][option] = _kl(reference, runner.log_probs(name), positions)
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


def _block_modules(model: nn.Module, names) -> tuple[str, ...]:
    prefix = f"{arch_of(model.config.model_type).blocks}."
    return tuple(n for n in names if n.startswith(prefix))


def _kl(reference: list[torch.Tensor], log_probs: list[torch.Tensor], positions: int) -> float:
    """Mean KL(reference || log_probs) over `positions`, clamped at 0 (rounding noise)."""
    kl = sum((r.exp() * (r - s)).sum(-1).sum().item() for r, s in zip(reference, log_probs))
    return max(kl / positions, 0.0)


@torch.no_grad()
def joint_kl(model: nn.Module, runner: "_TailRunner", allocation: dict[str, Option]) -> float:
    """Measured KL of the whole plan: every module RTN-quantized with its option at once (one forward)."""
    originals = {}
    for name, option in allocation.items():
        layer = model.get_submodule(name)
        originals[name] = layer.weight.data.clone()
        quantized = _rtn_weight(linear_weight(layer), *option).to(layer.weight.dtype)
        layer.weight.data.copy_(quantized.t() if Conv1D and isinstance(layer, Conv1D) else quantized)
    first = min(allocation, key=lambda n: (n.startswith(runner.prefix), n))  # anything before block 0 first
    kl = _kl(runner.reference, runner.log_probs(first), runner.samples.numel())
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
    group = _group(cols, group)
    groups = weight.reshape(rows, cols // group, group)
    scale, zero = fit_grid(groups, bits, False, "int")
    codes = quantize_to_grid(groups, scale, zero, bits, "int")
    return dequantize(codes, scale, zero, "int").reshape(rows, cols)


def allocate(costs: dict[str, dict[Any, int]], loss: dict[str, dict[Any, float]],
             budget_bits: int) -> dict[str, Any]:
    """Multiple-choice knapsack: one option per module, total cost <= budget_bits, least summed loss.

    costs[name][option] are storage bits, loss[name][option] the measured KL. Solved by dynamic
    programming over the bits above every module's cheapest option, in cells of slack / CELLS_PER_MODULE
    per module with costs rounded up (so the plan always fits; at most one cell per module unused).
    Exact up to that rounding: a greedy walk along each module's convex hull strands slack where one
    large module (an embedding) steps coarsely, and the sizes it reaches then have gaps a plan fills.
    Over budget even at the cheapest options: the cheapest options.
    """
    names = list(costs)
    options = {n: sorted(costs[n], key=lambda o, n=n: (costs[n][o], loss[n][o])) for n in names}
    base = {n: costs[n][options[n][0]] for n in names}
    slack = budget_bits - sum(base.values())
    if slack <= 0:
        return {n: options[n][0] for n in names}
    cells = CELLS_PER_MODULE * len(names)
    best = np.zeros(cells + 1)  # best[c]: least loss of the modules so far within c cells
    choices = []
    for n in names:
        table = np.full((len(options[n]), cells + 1), np.inf)
        for k, o in enumerate(options[n]):
            width = -(-(costs[n][o] - base[n]) * cells // slack)  # ceil in integers: exact
            if width <= cells:
                table[k, width:] = best[:cells + 1 - width] + loss[n][o]
        choices.append(table.argmin(0))  # ties: the cheaper option
        best = table.min(0)
    choice, cell = {}, cells
    for n, picks in zip(reversed(names), reversed(choices)):
        o = options[n][picks[cell]]
        choice[n] = o
        cell -= -(-(costs[n][o] - base[n]) * cells // slack)
    return {n: choice[n] for n in names}


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


def _candidates(model: nn.Module, group: int, embedding: str | None = None):
    """(options per module, the embedding's name, exact storage bits per module and option, bits of
    everything the planner does not touch)."""
    from .artifact import storage_bits

    candidates: dict[str, tuple[Option, ...]] = {n: linear_options(group) for n in block_linear_names(model)}
    embed_name = embedding or next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    candidates[embed_name] = embedding_options(group)
    modules = {n: model.get_submodule(n) for n in candidates}
    widths = sorted({linear_weight(modules[n]).shape[1] for n in candidates if n != embed_name})
    if widths and all(w % group for w in widths):
        common = [d for d in (32, 64, 96, 128, 192, 256) if all(w % d == 0 for w in widths)]
        raise UserError(f"group_size={group} divides none of the block linears' input widths "
                        f"({', '.join(map(str, widths))}); use one that does, e.g. "
                        f"{', '.join(map(str, common)) or min(widths)}")
    dense = {n: sum(t.numel() * 16 for t in m.state_dict().values()) for n, m in modules.items()}
    costs = {n: {o: _quant_bits(modules[n], o) for o in candidates[n]} for n in candidates}
    return candidates, embed_name, costs, storage_bits(model) - sum(dense.values())


def floor_bpw(model: nn.Module, group: int = 64) -> float:
    """The smallest whole-model bpw a quantization plan reaches (every module at its fewest bits)."""
    _, _, costs, fixed = _candidates(model, group)
    return (fixed + sum(min(c.values()) for c in costs.values())) / count_params(model)


def plan_bits(model: nn.Module, target_bpw: float, samples: torch.Tensor, group: int = 64,
              embedding: str | None = None,
              progress: Callable[..., None] | None = None,
              dtype: torch.dtype | None = None,
              sensitivity: dict[str, dict[Option, float]] | None = None, device: str = "cpu") -> Plan:
    """Plan a (bits, group) option per module for a whole-model target (all stored bits / params).

    Sensitivities are measured on a copy of the model in `dtype` (default float32, so that every
    machine makes the same plan: bfloat16 is 2.6x faster on CPUs with native bf16, but a plan made
    with it differed between two machines; pass fastest_dtype() to trade that away), unless
    an earlier plan's are passed (`sensitivity`, re-planning the same model for another target).
    They are measured on `device` (a GPU sums float32 in another order than a CPU, so the two can
    differ where two options' KLs tie to rounding; every CPU, and every GPU, gives the same plan).
    progress(done, total) as sensitivities are measured, then progress(done, total, "joint") as the
    candidate plans' whole-model KLs are.
    """
    params = count_params(model)
    candidates, embed_name, costs, fixed = _candidates(model, group, embedding)
    budget = int(target_bpw * params) - fixed
    floor = sum(min(c.values()) for c in costs.values())
    if budget < floor:
        raise UserError(f"--target-bpw {target_bpw}: the smallest plan (every module at its fewest "
                        f"bits: 2-bit codes, one scale per row) is "
                        f"{(fixed + floor) / params:.3f} bpw; ask for at least that")
    probe = copy.deepcopy(model).to(device, dtype or torch.float32)
    runner = _TailRunner(probe, samples.to(device), 4, observe=_block_modules(probe, candidates))
    if sensitivity is None:
        sensitivity = measure_sensitivity(probe, candidates, runner.samples, progress=progress, runner=runner)
    # Single-module KLs add up only while errors are small: many modules at 2 bits compound far
    # beyond the sum. So plans are built with the fewest bits allowed at 2, 3 and 4 (linears) and
    # 2, 3, 4 (embedding), and the one whose *measured* whole-plan KL is lowest wins.
    drafts: list[tuple[dict[str, Option], tuple[int, int]]] = []
    for linear_floor, embed_floor in itertools.product((2, 3, 4), (2, 3, 4)):
        allowed = {n: {o: c for o, c in costs[n].items()
                       if o[0] >= (embed_floor if n == embed_name else linear_floor)} for n in costs}
        if sum(min(c.values()) for c in allowed.values()) > budget:
            continue
        allocation = allocate(allowed, sensitivity, budget)
        if all(allocation != d[0] for d in drafts):
            drafts.append((allocation, (linear_floor, embed_floor)))
    if not drafts:  # only the unrestricted options fit
        drafts.append((allocate(costs, sensitivity, budget), (2, 2)))
    plans = []
    for done, (allocation, floors) in enumerate(drafts):
        plans.append((joint_kl(probe, runner, allocation), allocation, floors))
        if progress:
            progress(done + 1, len(drafts), "joint")
    del probe, runner
    measured, allocation, floors = min(plans, key=lambda p: p[0])
    planned = fixed + sum(costs[n][o] for n, o in allocation.items())
    return Plan(allocation, sensitivity, planned, params, measured,
                {f"linears>={a},embedding>={b}": kl for kl, _, (a, b) in plans})


def plan_recipe(plan: Plan, embedding: str) -> list[dict[str, Any]]:
    """The plan as recipe stages: RTN for the embedding, one GPTQ stage per linear option."""
    bits, group = plan.allocation[embedding]
    stages: list[dict[str, Any]] = [{"method": "rtn", "bits": bits, "group_size": group,
                                     "targets": [f"^{re.escape(embedding)}$"]}]
    for option in sorted({o for n, o in plan.allocation.items() if n != embedding}):
        names = sorted(n for n, o in plan.allocation.items() if o == option and n != embedding)
        stages.append({"method": "gptq", "bits": option[0], "group_size": option[1], "act_order": True,
                       "targets": [f"^{re.escape(n)}$" for n in names]})
    return stages



QAT_CODE_GROWTH = 1.035
"""How much larger the lossless-coded file of trained (qat) codes is than the GPTQ codes it started
from, at most: LSQ-learned steps spread the code histogram, so zstd codes it less tightly. Measured
on SmolLM2-135M (benchmarks/RESULTS.md, quality frontier): +1.6% to +3.3% over six runs at 2.3-4.0 bpw.
A plan with a qat stage is fit to target / QAT_CODE_GROWTH so its trained file lands at or under the target."""


def qat_stage(steps: int) -> dict[str, Any]:
    """The recovery stage of the quantization route (--distill): `qat` over the planned codes (each
    module keeps its bits and group), Block-AP then `steps` end-to-end steps of 8 windows."""
    return {"method": "qat", "steps": steps, "batch": 8}
