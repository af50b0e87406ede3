"""The registered `kan` method: every selected linear becomes a KanLinear (layers/kan: levels of KanFields)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import MethodConfig, check
from ...errors import UserError
from ...layers.kan import KanLinear
from ...layers.base import linear_bias, linear_weight
from ...registry import register
from ...tracking import Tracker, check_tracking
from ..base import LayerwiseMethod
from .compressor import fit_levels, layout_of


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
