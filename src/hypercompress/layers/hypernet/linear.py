"""GeneratedLinear: a linear layer whose weight comes from the hypernetwork (nothing of W is stored).

generate mode: W = G(l, t);  residual mode: W = base.dense_weight() + G(l, t), where `base` is the
module an earlier recipe stage made (e.g. a 2-bit GPTQ QuantLinear), kept and stored as it is.
The layer stores only its bias (generate mode) or its base (whose bias it uses); the generator lives
once at the model root.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..base import CompressedModule

BIAS_DTYPE = torch.float16


class GeneratedLinear(CompressedModule):
    kind = "generated_linear"
    wraps_base = True

    def __init__(self, in_features: int, out_features: int, layer: int, type: int, bias: bool = False,
                 base: dict[str, Any] | None = None):
        super().__init__()
        self.in_features, self.out_features, self.layer, self.type = in_features, out_features, layer, type
        self.register_buffer("bias", torch.zeros(out_features, dtype=BIAS_DTYPE) if bias else None)
        self.base_layout = base
        if base is not None:
            from ..build import build_stored

            self.base = build_stored(base, f"the {self.kind} base", nested=True)
            if (self.base.out_features, self.base.in_features) != (out_features, in_features):
                raise ValueError("the base's shape differs from the generated layer's")
        # (out, in), set by the generator: a tensor with autograd while training, else the cached
        # regenerated weight; a non-persistent buffer, so .to(device) moves it and it is never saved
        self.register_buffer("generated", None, persistent=False)
        self.maker: Callable[[], torch.Tensor] | None = None  # HyperGenerator.install_lazy's, while training

    def set_generated(self, weight: torch.Tensor | None, maker: Callable[[], torch.Tensor] | None = None) -> None:
        """The generator's output for this layer: a tensor with autograd while training, else cached;
        or (weight None) a `maker` returning it, called inside forward under checkpointing."""
        self.generated, self.maker = weight, maker

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.maker is not None:
            weight = self.maker().to(dtype)
            return weight if self.base_layout is None else weight + self.base.dense_weight(dtype)
        if self.generated is None:
            raise RuntimeError("GeneratedLinear used before its generator ran (load the artifact with "
                               "hypercompress.storage.artifact.load, which regenerates the weights)")
        weight = self.generated.to(dtype)
        if self.base_layout is not None:
            weight = weight + self.base.dense_weight(dtype)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.maker is not None and torch.is_grad_enabled():
            # W is made, used and dropped here, then made again in backward (Chen et al. 2016):
            # only x and the generator's contexts are kept for backward, never W
            return checkpoint(self._linear, x, use_reentrant=False)
        fast = self.fast_or_none(x)
        if fast is not None:
            return fast(x)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.base_layout is None else getattr(self.base, "bias", None)
        bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def layout(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "layer": self.layer,
                "type": self.type, "bias": self.bias is not None, "base": self.base_layout}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "GeneratedLinear":
        return cls(**layout)

    def extra_repr(self) -> str:
        mode = "generate" if self.base_layout is None else f"residual on {self.base_layout['kind']}"
        return f"in={self.in_features}, out={self.out_features}, layer={self.layer}, type={self.type}, {mode}"
