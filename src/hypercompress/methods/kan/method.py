"""The registered `kan` method: every selected linear becomes a KanLinear (levels of KanFields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MethodConfig, check
from ...errors import UserError
from ...layers import register_kind
from ...modules import CompressedModule, linear_bias, linear_weight
from ...registry import register
from ...tracking import Tracker, check_tracking
from ..base import LayerwiseMethod
from .compressor import evaluate, field_from_layout, fit_levels, layout_of


@dataclass
class KanConfig(MethodConfig):
    num_levels: int = 2     # coarse-to-fine levels (each fits what the previous leave)
    hidden: int = 8         # hidden width of every level's KAN [2c -> hidden -> 1]
    code_dim: int = 4       # c: size of each row / column code
    grid: int = 4           # spline intervals of level 1 (doubled per level)
    steps: int = 200        # Adam steps per level
    lr: float = 1e-2
    batch: int = 4096       # matrix entries per Adam step (the same positions in every matrix fitted together)
    together: int = 32      # matrices of one shape fitted at once (memory: together x batch x 2c x grid)
    device: str | None = None  # where each matrix is fitted; None: the run's --device (cuda for real models)
    log_dir: str | None = None        # TensorBoard event files here (package tensorboard)
    wandb_project: str | None = None  # also log to this W&B project (package wandb; offline unless WANDB_MODE says)
    wandb_dir: str | None = None      # W&B run files here (default: log_dir, else the working directory)
    seed: int = 0

    def validate(self) -> None:
        for key in ("num_levels", "hidden", "code_dim", "grid"):
            check(getattr(self, key) >= 1, f"{key}={getattr(self, key)}: must be >= 1")
        check(self.steps >= 0, f"steps={self.steps}: must be >= 0")
        check(self.lr > 0, f"lr={self.lr}: must be positive")
        check(self.batch >= 1, f"batch={self.batch}: must be >= 1")
        check(self.together >= 1, f"together={self.together}: must be >= 1")
        check(self.device is None or self.device == "cpu" or self.device.startswith("cuda"),
              f"device={self.device!r}: cpu or cuda")
        check_tracking(self)


@register_kind
class KanLinear(CompressedModule):
    """W = sum of the levels' KanField matrices (float16 parameters, computed in float32, cached)."""

    kind = "kan"

    def __init__(self, levels: list[dict[str, int]], bias: bool = False):
        super().__init__()
        self.levels_layout = levels
        self.levels = nn.ModuleList(field_from_layout(layout) for layout in levels)
        self.out_features, self.in_features = levels[0]["d_out"], levels[0]["d_in"]
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float16) if bias else None)
        self._cache: torch.Tensor | None = None

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._cache is None or self._cache.device != self.device():
            self._cache = evaluate(self.levels)[0]
        return self._cache.to(dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # new parameters: evaluate again
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_or_none(x)
        if fast is not None:
            return fast(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def layout(self) -> dict[str, Any]:
        return {"levels": self.levels_layout, "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "KanLinear":
        return cls(**layout)

    @classmethod
    def layout_problem(cls, layout: dict[str, Any]) -> str | None:
        keys = {"d_out", "d_in", "code_dim", "hidden", "grid"}
        levels = layout["levels"]
        if not levels or any(set(level) != keys for level in levels):
            return f"levels must be a non-empty list of {{{', '.join(sorted(keys))}}}"
        if any(not 1 <= level[k] <= (1 << 12) for level in levels for k in ("code_dim", "hidden", "grid")):
            return "code_dim, hidden and grid must be in 1..4096"
        shapes = {(level["d_out"], level["d_in"]) for level in levels}
        return None if len(shapes) == 1 and min(next(iter(shapes))) >= 1 else "levels disagree on the shape"


@register("kan", KanConfig)
class Kan(LayerwiseMethod):
    steps_done = 0  # Adam steps logged so far (the tracker's step), over every call

    def compress(self, name: str, layer: nn.Module) -> KanLinear:
        return dict(self.compress_many([name], lambda _: layer))[name]

    def compress_many(self, names, layer_of):
        """Matrices of one shape (a type across layers) are fitted together, `together` at a time.
        Every Adam step's loss, level, lr and entries_per_second go to the config's tracker under
        "kan", counted over all levels and groups."""
        c = self.config
        device = c.device or self.run_device
        if device != "cpu" and not torch.cuda.is_available():
            raise UserError(f"kan device={device}: no CUDA device is available; use device=cpu")
        with Tracker.of("kan", c) as tracker:
            yield from self._fit(names, layer_of, tracker)

    def _fit(self, names, layer_of, tracker: Tracker):
        c = self.config
        device = c.device or self.run_device

        def on_step(values: dict[str, float]) -> None:
            self.steps_done += 1
            tracker.log(values, self.steps_done)

        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name in names:
            by_shape.setdefault(tuple(linear_weight(layer_of(name)).shape), []).append(name)
        for group in by_shape.values():
            for start in range(0, len(group), c.together):
                chunk = group[start:start + c.together]
                layers = [layer_of(name) for name in chunk]
                levels = fit_levels(torch.stack([linear_weight(layer) for layer in layers]), c.num_levels,
                                    (c.hidden,), c.code_dim, c.grid, c.steps, c.lr, c.seed, device, c.batch,
                                    on_step if tracker.active else None)
                for m, (name, layer) in enumerate(zip(chunk, layers)):
                    yield name, _kan_linear([field.select(m) for field in levels], layer)


def _kan_linear(fields: list, layer: nn.Module) -> KanLinear:
    module = KanLinear([layout_of(f) for f in fields], linear_bias(layer) is not None)
    module.levels.load_state_dict(nn.ModuleList(fields).state_dict())
    if module.bias is not None:
        module.bias.copy_(linear_bias(layer))
    return module
