"""`rotate`: fold an orthogonal rotation of the residual stream into the weights, exactly.

A pre-norm transformer with RMSNorm computes the same function when its residual stream is rotated
by any orthogonal Q (SliceGPT's "computational invariance", Ashkboos et al. 2024): RMSNorm(h Q) =
RMSNorm(h) Q once each norm's scale g is folded into the linears that read it (W <- W diag(g)).
With row vectors h (1, d):
- embedding rows and every linear that reads the residual (q, k, v, gate, up, lm_head): W <- W Q;
- every linear that writes into it (o_proj, down_proj): W <- Q^T W, bias b <- b Q.
Nothing is added at run time, so the model stays an ordinary model of its architecture. The point
is quantization: a rotation spreads the residual stream's outlier channels over all channels, so
the weights that read and write it have fewer outliers for a grid to cover (QuaRot, Ashkboos et al.
2024, rotation R1; SpinQuant, Liu et al. 2024, learns it). Q here is a randomized Hadamard matrix
H diag(s) / sqrt(d) when d is a power of two, else H_p (x) R_m for d = p m with p the largest power of
two dividing d and R_m a seeded random orthogonal matrix (QR of a Gaussian), rows signed at random.

A tied lm_head is untied first: the final norm's scale folds into the head but not into the
embedding, so the two matrices differ afterwards (the head's table is then stored, and counted).
Only RMSNorm pre-norm architectures (arch.ArchSpec.rotatable: llama, mistral, qwen2, qwen3, phi3) are
rotated; GPT-2's LayerNorm subtracts the mean, which a rotation does not commute with, and is refused.
Qwen3's per-head q/k norms act after q_proj/k_proj, whose outputs a residual rotation leaves unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import arch_of, rotatable_types
from ..config import MethodConfig, check
from ..errors import UserError
from ..layers.base import CompressedModule
from ..registry import register
from .base import WholeModelMethod


@dataclass
class RotateConfig(MethodConfig):
    seed: int = 0  # the random signs and the non-power-of-two factor of Q

    def validate(self) -> None:
        check(self.seed >= 0, f"seed={self.seed}: must be >= 0")


def orthogonal_matrix(dim: int, seed: int) -> torch.Tensor:
    """A (dim, dim) float64 orthogonal Q: randomized Hadamard (Sylvester) on the power-of-two factor
    of dim, Kronecker with a seeded random orthogonal matrix on the rest; rows signed at random."""
    generator = torch.Generator().manual_seed(seed)
    power = dim & -dim  # the largest power of two dividing dim
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < power:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    rest = dim // power
    q, r = torch.linalg.qr(torch.randn(rest, rest, generator=generator, dtype=torch.float64))
    q = (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()  # Haar-distributed (Mezzadri 2007)
    signs = torch.randint(0, 2, (dim,), generator=generator).double() * 2 - 1
    return signs[:, None] * torch.kron(hadamard / power ** 0.5, q)


def check_rotatable(model: nn.Module) -> None:
    """UserError naming why a family's residual stream cannot be rotated exactly (arch table)."""
    model_type = model.config.model_type
    spec = arch_of(model_type)
    if not spec.rotatable:
        why = ("normalizes with LayerNorm (mean subtracted), which a rotation does not commute with"
               if spec.norm == "layer" else "routes its MLP through experts (folding a rotation into the router "
               "and every expert is not written)" if spec.experts else "normalizes after its sublayers "
               "(post-norm), so no linear reads a norm a rotation could fold into")
        raise UserError(f"rotate: {model_type} {why}; rotate supports {', '.join(rotatable_types())}")


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> None:
    """Fold the norms' scales into their readers, untie the head, and rotate the residual stream
    by orthogonal_matrix(hidden_size, seed), in place. Logits are unchanged up to rounding (the
    products are formed in float64). Raises UserError for an architecture without RMSNorm blocks
    or a model that already holds compressed modules."""
    check_rotatable(model)
    spec = arch_of(model.config.model_type)
    if any(isinstance(m, CompressedModule) for m in model.modules()):
        raise UserError("rotate changes dense weights: put it first in the recipe, before any compressing stage")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False
    Q = orthogonal_matrix(embedding.weight.shape[1], seed)
    for block in model.get_submodule(spec.blocks):
        for norm, readers in spec.norm_readers:
            _fold_and_rotate(block.get_submodule(norm), [block.get_submodule(r) for r in readers], Q)
        for name in spec.residual_writers:  # the arch table's writers of the residual stream
            writer = block.get_submodule(name)
            _set(writer.weight, Q.T @ writer.weight.double())
            if writer.bias is not None:
                _set(writer.bias, writer.bias.double() @ Q)
    _fold_and_rotate(model.get_submodule(spec.final_norm), [head], Q)
    _set(embedding.weight, embedding.weight.double() @ Q)


def _fold_and_rotate(norm: nn.Module, readers: list[nn.Module], Q: torch.Tensor) -> None:
    scale = norm.weight.double()
    for reader in readers:
        _set(reader.weight, (reader.weight.double() * scale[None, :]) @ Q)
    norm.weight.fill_(1.0)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@register("rotate", RotateConfig)
class Rotate(WholeModelMethod):
    """Whole-model, data-free and deterministic: run again on resume, before a checkpoint restores."""

    needs_calibration = False
    needs_teacher = False
    replay_on_resume = True
    exact = True

    def check_model(self, model) -> None:
        check_rotatable(model)

    def apply(self, model, names, teacher, calib, *, device="cpu", progress=None, checkpoint_dir=None,
              resume=False) -> None:
        rotate_residual(model, self.config.seed)
