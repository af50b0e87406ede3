"""GPTQ weight quantization (Frantar et al. 2022) behind the layer-wise calibration runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import MethodConfig, check
from ..layers.quant_linear import QuantLinear, resolve_group_size
from ..layers.base import linear_bias, linear_weight, linear_weight_shape
from ..registry import register
from .base import LayerwiseMethod
from .damping import DAMP_RANGE
from .gptq_solver import gptq_solve, gptq_solve_shared
from .rtn import RtnConfig


@dataclass
class GptqConfig(RtnConfig):
    """RTN's grid options (bits, group_size, symmetric, zero_point) plus the solver's."""

    act_order: bool = True      # columns by descending Hessian diagonal (static groups); on by default:
                                # it measured better (SmolLM2 w4 g64, WikiText-2 first 64 windows,
                                # H200: 34.94 vs 37.37 without)
    damp: float = 0.01          # dampening: this fraction of mean(diag H) is added to the diagonal
    block_size: int = 128       # columns per lazy-update block (rounded to whole groups)

    def validate(self) -> None:
        super().validate()
        check(0 < self.damp < 1, DAMP_RANGE.format(self.damp))
        check(self.block_size > 0, f"block_size={self.block_size}: must be positive")


class HessianMethod(LayerwiseMethod):
    """Accumulates H = 2/n sum_x x x^T per layer from its calibration inputs (GPTQ's add_batch)."""

    needs_calibration = True
    gram_dtype = torch.float32  # dtype of the X^T X product per batch (sums are float64)

    def __init__(self, config: MethodConfig):
        super().__init__(config)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        """x (..., in). Linears fed the same tensor (q/k/v, gate/up) share one X^T X product."""
        if self._last is not None and self._last[0] is x:
            product = self._last[1]
        else:
            flat = x.reshape(-1, x.shape[-1]).to(self.gram_dtype)
            product = (flat.T @ flat).double()  # float32 GEMM, float64 accumulation across batches
            self._last = (x, product)
        if name not in self._sums:
            self._sums[name] = torch.zeros_like(product)
            self._counts[name] = 0
        self._sums[name] += product
        self._counts[name] += x.numel() // x.shape[-1]

    def observed_bytes(self, name: str, layer: nn.Module) -> int:
        """The float64 (in, in) sum of X^T X."""
        return linear_weight_shape(layer)[1] ** 2 * 8

    def statistics(self) -> list[dict]:
        """sum X^T X (float64) and the token count per layer."""
        return [self._sums, self._counts]

    def hessian(self, name: str) -> torch.Tensor:
        """(in, in) float64; frees the accumulator."""
        self._last = None
        return 2 * self._sums.pop(name) / self._counts.pop(name)


def gptq_module(name: str, layer: nn.Module, hessian: torch.Tensor, c: GptqConfig) -> QuantLinear:
    """`layer` (nn.Linear or Conv1D, on any device) quantized by GPTQ with `c` against `hessian`
    (in, in) of its inputs: a QuantLinear on the CPU. UserError for a group that does not divide
    the input width or a Hessian no damping makes positive definite."""
    weight = linear_weight(layer)
    group = resolve_group_size(name, weight.shape[1], c.group_size)
    codes, scale, zero = gptq_solve(weight, hessian, c.bits, group, c.symmetric,
                                    c.zero_point, c.act_order, c.damp, c.block_size, layer=name)
    return QuantLinear.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), linear_bias(layer),
                                  c.bits, c.symmetric, c.zero_point)


def gptq_modules_shared(entries: list[tuple[str, nn.Module, int, int]], hessian: torch.Tensor,
                        c: GptqConfig) -> list[QuantLinear]:
    """GPTQ of linears fed one input (q/k/v, gate/up), each at (bits, group) options of its own, in
    one act-order pass against their shared `hessian` (gptq_solver.gptq_solve_shared): entries
    [(name, layer, bits, group)] -> a QuantLinear each (on the CPU), as gptq_module with `c`'s
    grid and solver settings and act_order gives them up to float rounding. Without act_order each
    entry is solved alone."""
    if not c.act_order:
        return [gptq_module(name, layer, hessian, GptqConfig(**{**vars(c), "bits": bits, "group_size": group}))
                for name, layer, bits, group in entries]
    parts = [(linear_weight(layer), bits, resolve_group_size(name, linear_weight(layer).shape[1], group))
             for name, layer, bits, group in entries]
    solved = gptq_solve_shared(parts, hessian, c.symmetric, c.zero_point, c.damp, c.block_size,
                               layer=" / ".join(sorted({e[0] for e in entries})))
    return [QuantLinear.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), linear_bias(layer), bits, c.symmetric,
                                   c.zero_point)
            for (_name, layer, bits, _group), (codes, scale, zero) in zip(entries, solved)]


def solve_shared(routes: dict[str, "GPTQ"], layer_of: Callable[[str], nn.Module]
                 ) -> Iterator[tuple[str, QuantLinear]]:
    """(name, QuantLinear) for every linear of `routes` (name -> the GPTQ stage that quantizes it,
    its Hessian accumulated there): the linears whose Hessians are equal (fed one input) and whose
    stages share solver settings are solved in one pass (gptq_modules_shared), each at its own
    stage's bits and group size. layer_of(name) gives the layer."""
    settings = lambda c: (c.symmetric, c.zero_point, c.damp, c.block_size, c.act_order)  # noqa: E731
    keyed = [((settings(m.config), m.hessian(n)), n) for n, m in routes.items()]
    for (_key, hessian), names in shared_inputs(keyed, lambda a, b: a[0] == b[0] and same_hessian(a[1], b[1])):
        entries = [(n, layer_of(n), routes[n].config.bits, routes[n].config.group_size) for n in names]
        yield from zip(names, gptq_modules_shared(entries, hessian, routes[names[0]].config))


def same_hessian(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two Hessians are one (linears fed the same input accumulate equal sums)."""
    return a.shape == b.shape and bool(torch.equal(a, b))


def shared_inputs(keyed: list[tuple[object, str]], same) -> list[tuple[object, list[str]]]:
    """[(key, names)]: the names grouped by `same(key, key)`, in first-seen order."""
    groups: list[tuple[object, list[str]]] = []
    for key, name in keyed:
        match = next((g for g in groups if same(g[0], key)), None)
        if match is None:
            groups.append((key, [name]))
        else:
            match[1].append(name)
    return groups


@register("gptq", GptqConfig)
class GPTQ(HessianMethod):
    def compress(self, name: str, layer: nn.Module) -> QuantLinear:
        return gptq_module(name, layer, self.hessian(name), self.config)

    def compress_many(self, names: list[str], layer_of: Callable[[str], nn.Module]
                      ) -> Iterator[tuple[str, QuantLinear]]:
        return solve_shared({name: self for name in names}, layer_of)
