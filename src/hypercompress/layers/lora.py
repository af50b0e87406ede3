"""LoRA adapter on a compressed linear layer: y = base(x) + B (A x) (Hu et al. 2021).

`base` is any compressed module (quant, sparse, lowrank, ...), stored under NAME.base.* as its kind
stores it; A (rank, in) and B (out, rank) are float16 and counted in the artifact like everything
else. Distillation recovery trains A and B (and may fold them into the base, ReLoRA-style:
`merge_into_base`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import CompressedModule

FACTOR_DTYPE = torch.float16


class LoRALinear(CompressedModule):
    kind = "lora"
    wraps_base = True  # its base may not itself wrap one (layers/build.build_stored)
    own_path = "the base's own path + the adapter (two small GEMMs)"

    def __init__(self, in_features: int, out_features: int, rank: int, base: dict[str, Any]):
        super().__init__()
        from .build import build_stored

        self.in_features, self.out_features, self.rank, self.base_layout = in_features, out_features, rank, base
        self.base = build_stored(base, f"the {self.kind} base", nested=True)
        if (self.base.out_features, self.base.in_features) != (out_features, in_features):
            raise ValueError("the base's shape differs from the adapter's")
        self.register_buffer("A", torch.zeros(rank, in_features, dtype=FACTOR_DTYPE))
        self.register_buffer("B", torch.zeros(out_features, rank, dtype=FACTOR_DTYPE))

    @classmethod
    def wrap(cls, base: CompressedModule, rank: int, generator: torch.Generator) -> "LoRALinear":
        """A new adapter around `base`: A ~ Kaiming-uniform, B = 0, so the output starts unchanged."""
        out_features, in_features = base.out_features, base.in_features
        layer = cls(in_features, out_features, rank, {"kind": base.kind, "layout": base.layout()})
        layer.base = base
        bound = 1 / in_features ** 0.5
        layer.A.copy_((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        return layer

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.dense_weight(dtype) + self.B.to(dtype) @ self.A.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """Fold B A into the base in its own format, and zero B (ReLoRA's merge, Lialin et al. 2023):
        a quant base re-rounds W + B A onto its grid (same scales and zeros, new codes); a lowrank
        base keeps its rank by truncated SVD of U V + B A."""
        from ..formats.packing import pack_codes
        from ..linalg import truncated_svd
        from .low_rank import LowRankLinear
        from .quant_linear import QuantLinear, quantize_to_grid

        target = self.base.dense_weight(torch.float32) + self.B.float() @ self.A.float()
        if isinstance(self.base, QuantLinear):
            base = self.base
            groups = base.scales.shape[1]
            scale = base.scales.float()[..., None]
            zero = base._zero(torch.float32)
            zero_point = "float" if (not base.symmetric and base.zero_point == "float") else "int"
            codes = quantize_to_grid(target.view(base.out_features, groups, base.group_size), scale, zero,
                                     base.bits, zero_point)
            base.qweight.copy_(pack_codes(codes.reshape(-1).to(torch.uint8), base.bits))
        elif isinstance(self.base, LowRankLinear):
            U, V = truncated_svd(target, self.base.rank)
            self.base.U.copy_(U.to(self.base.U.dtype))
            self.base.V.copy_(V.to(self.base.V.dtype))
        else:
            raise TypeError(f"cannot merge an adapter into a {self.base.kind} module")
        self.B.zero_()

    def macs(self) -> int:
        return self.base.macs() + self.rank * (self.in_features + self.out_features)

    def layout(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "base": self.base_layout}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "LoRALinear":
        return cls(**layout)

    def extra_repr(self) -> str:
        return f"rank={self.rank} on {self.base_layout['kind']}"
