"""`distill`: train what earlier stages left trainable against the frozen teacher (KD recovery).

Trains, by distill.py's loss (KL on logits + per-block output matching + activation stability):
the factors U, V of every LowRankLinear (SVD / ASVD stages), and the norms' weights when
`train_norms`. Factors are trained in float32 and stored back in float16 (their stored dtype), so
the artifact's size does not change; only the numbers in it do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig, check
from ..distill import DistillSettings, distill
from ..errors import UserError
from ..layers import LowRankLinear
from ..registry import register
from .base import WholeModelMethod


@dataclass
class DistillConfig(MethodConfig):
    steps: int = 100
    batch: int = 4
    lr: float = 1e-4
    local_weight: float = 0.1
    stability_weight: float = 0.01
    train_norms: bool = True
    log_dir: str | None = None
    seed: int = 0

    def validate(self) -> None:
        check(self.steps >= 1 and self.batch >= 1, "steps and batch must be >= 1")
        check(self.lr > 0, f"lr={self.lr}: must be positive")


@register("distill", DistillConfig)
class Distill(WholeModelMethod):
    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        factors = [(n, m) for n in names if isinstance(m := model.get_submodule(n), LowRankLinear)]
        if not factors:
            raise UserError("distill trains low-rank factors: put an svd or asvd stage before it "
                            "(no LowRankLinear among the selected modules)")
        params: dict[str, nn.Parameter] = {}
        for name, module in factors:
            for key in ("U", "V"):
                param = nn.Parameter(getattr(module, key).float())
                del module._buffers[key]
                module.register_parameter(key, param)
                params[f"{name}.{key}"] = param
        if c.train_norms:
            for name, module in model.named_modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight.requires_grad_(True)
                    params[f"{name}.weight"] = module.weight
        model.to(device)
        teacher.to(device)
        settings = DistillSettings(c.steps, c.batch, c.lr, c.local_weight, c.stability_weight, c.seed,
                                   log_dir=c.log_dir)
        distill(model, teacher, calib, params, lambda: None, settings, device,
                None if checkpoint_dir is None else Path(checkpoint_dir) / "distill", resume, progress)
        model.to("cpu")
        teacher.to("cpu")
        with torch.no_grad():
            for name, module in factors:
                for key in ("U", "V"):
                    value = getattr(module, key).detach().to(torch.float16)
                    del module._parameters[key]
                    module.register_buffer(key, value)
        model.requires_grad_(False)
