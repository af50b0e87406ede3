"""`structured`: remove whole blocks, MLP channels and key/value head groups by measured importance.

Depth pruning drops the `drop_layers` blocks of lowest block influence (ShortGPT, Men et al. 2024);
width pruning keeps, in every block, the `mlp_keep` fraction of MLP channels and the
`head_groups_keep` fraction of key/value groups of highest activation x weight score (Minitron,
Muralidharan et al. 2024; LLM-Pruner, Ma et al. 2023 for the coupled-structure view). All scores come
from one forward pass over `samples` calibration windows (importance.py). The model shrinks for real:
its linears are sliced and its config rewritten, so the artifact stores fewer tensors and reloads
through the ordinary constructor. A structural stage must come first in a recipe (it slices dense
layers); distillation recovery or weight-level stages follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...arch import arch_of, block_linear_names
from ...config import MethodConfig, check
from ...errors import UserError
from ...layers.base import CompressedModule
from ...registry import register
from ..base import WholeModelMethod
from .importance import measure
from .surgery import drop_blocks, keep_channels, keep_groups


@dataclass
class StructuredConfig(MethodConfig):
    drop_layers: int = 0            # whole blocks removed, lowest block influence first
    mlp_keep: float = 0.75          # fraction of MLP channels kept in every block
    head_groups_keep: float = 1.0   # fraction of key/value head groups kept (with their query heads)
    samples: int = 8                # calibration windows measured

    def validate(self) -> None:
        check(self.drop_layers >= 0, f"drop_layers={self.drop_layers}: must be >= 0")
        check(0 < self.mlp_keep <= 1, f"mlp_keep={self.mlp_keep}: must be in (0, 1]")
        check(0 < self.head_groups_keep <= 1, f"head_groups_keep={self.head_groups_keep}: must be in (0, 1]")
        check(self.samples >= 1, f"samples={self.samples}: must be >= 1")
        check(self.drop_layers > 0 or self.mlp_keep < 1 or self.head_groups_keep < 1,
              "structured removes nothing: set drop_layers > 0, mlp_keep < 1 or head_groups_keep < 1")


def kept(count: int, fraction: float) -> int:
    """How many of `count` structures a kept fraction leaves (at least one)."""
    return max(1, round(count * fraction))


@register("structured", StructuredConfig)
class Structured(WholeModelMethod):
    needs_teacher = False
    replay_on_resume = True  # its surgery is not in a checkpoint's modules; deterministic, so re-run

    def check_model(self, model) -> None:
        c = self.config
        spec = arch_of(model.config.model_type)
        layers = len(model.get_submodule(spec.blocks))
        if c.drop_layers >= layers:
            raise UserError(f"drop_layers={c.drop_layers}: the model has {layers} blocks; keep at least one")
        if c.mlp_keep < 1 and spec.experts:
            raise UserError(f"mlp_keep: {model.config.model_type}'s MLP is a mixture of experts (channel "
                            "pruning of experts is not written); prune its blocks or attention heads instead")
        if c.head_groups_keep < 1 and spec.attention is None:
            raise UserError(f"head_groups_keep: the query, key and value heads of {model.config.model_type} "
                            "are fused in one linear; prune its blocks or MLP channels instead")
        if c.head_groups_keep < 1 and spec.head_norms and spec.head_norm_span == "all":
            raise UserError(f"head_groups_keep: {model.config.model_type}'s q/k norms normalize all heads "
                            "together, so removing heads would rescale the kept ones; prune its blocks"
                            f"{'' if spec.experts else ' or MLP channels'} instead")

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        c = self.config
        spec = arch_of(model.config.model_type)
        if any(isinstance(model.get_submodule(n), CompressedModule) for n in block_linear_names(model)):
            raise UserError("structured slices dense layers: put it first in the recipe, before the "
                            "stages that quantize, prune or factorize them")
        self.check_model(model)
        model.to(device)
        scores = measure(model, calib[: c.samples].to(device))
        model.to("cpu")
        if progress:
            progress(1, 2, "importance measured")
        drop = sorted(scores.blocks.argsort()[: c.drop_layers].tolist())
        if c.mlp_keep < 1:  # width first, in every block; the dropped blocks go after
            count = kept(scores.channels[0].numel(), c.mlp_keep)
            keep_channels(model, [top(s, count) for s in scores.channels])
        if c.head_groups_keep < 1:
            count = kept(scores.groups[0].numel(), c.head_groups_keep)
            keep_groups(model, [top(s, count) for s in scores.groups])
        if drop:
            drop_blocks(model, drop)
        model.requires_grad_(False)
        if progress:
            progress(2, 2, f"dropped blocks {drop}")


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in ascending index order."""
    return scores.topk(count).indices.sort().values
