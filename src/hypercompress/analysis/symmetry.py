"""Symmetries a compressor can use: the residual stream's rotations and the MLP's neuron permutations.

- rotation: an RMSNorm transformer is invariant under an orthogonal rotation of its residual stream
  (SliceGPT's computational invariance; methods/rotation.py folds it into the weights). Measured here:
  how much a randomized Hadamard rotation lowers the outliers (kurtosis, max/median) of the weights
  that read and write the stream and of the stream itself on calibration text (QuaRot's motivation).
- permutation: an MLP computes the same function under any permutation of its hidden neurons.
  Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023): the permutation that best aligns
  block l+1's neurons to block l's, found by the Hungarian algorithm on the cosine similarity of the
  neurons' weight vectors [gate row, up row, down column]; reported is the mean cosine of matched
  neurons as they are and after alignment (how much of one block is a shuffled copy of another).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, arch_of, blocks_of, norm_of
from .weights import outlier_stats


def _readers(spec: ArchSpec) -> tuple[str, ...]:
    """The block linears that read the residual stream through a norm (the arch table's)."""
    return tuple(reader for _, readers in spec.norm_readers for reader in readers)


def _folded(block: nn.Module, leaf: str, spec: ArchSpec) -> torch.Tensor:
    """A linear's weight as the rotation sees it: a reader's with its RMSNorm scale folded in."""
    weight = block.get_submodule(leaf).weight.detach().float()
    norm = norm_of(spec, leaf)
    return weight * block.get_submodule(norm).weight.detach().float()[None, :] if norm else weight


def _mean_outliers(model: nn.Module, leaves: tuple[str, ...]) -> dict:
    spec = arch_of(model.config.model_type)
    stats = [outlier_stats(_folded(block, leaf, spec)) for block in blocks_of(model) for leaf in leaves]
    return {k: sum(s[k] for s in stats) / len(stats) for k in ("kurtosis", "max_over_median")}


@torch.no_grad()
def _stream_outliers(model: nn.Module, samples: torch.Tensor, device: str) -> dict:
    """Outliers of the residual stream entering each block (hidden states), averaged over blocks."""
    model.to(device)
    hidden = model(input_ids=samples.to(device), output_hidden_states=True).hidden_states[1:-1]
    stats = [outlier_stats(h.float().cpu()) for h in hidden] or [outlier_stats(torch.zeros(2))]
    return {k: sum(s[k] for s in stats) / len(stats) for k in ("kurtosis", "max_over_median")}


def rotation_outliers(model: nn.Module, samples: torch.Tensor, device: str = "cpu") -> dict | None:
    """{"readers"|"writers"|"stream": {"before": stats, "after": stats}} for a rotatable (RMSNorm,
    llama-like) model, None otherwise. The model is not changed (a copy is rotated)."""
    from ..methods.rotation import rotate_residual

    spec = arch_of(model.config.model_type)
    if not spec.rotatable:
        return None
    readers, writers = _readers(spec), spec.residual_writers
    rotated = copy.deepcopy(model)
    rotate_residual(rotated, seed=0)
    return {"readers": {"before": _mean_outliers(model, readers), "after": _mean_outliers(rotated, readers)},
            "writers": {"before": _mean_outliers(model, writers), "after": _mean_outliers(rotated, writers)},
            "stream": {"before": _stream_outliers(model, samples, device),
                       "after": _stream_outliers(rotated, samples, device)}}


def neuron_vectors(block: nn.Module) -> torch.Tensor:
    """(intermediate, 3 x hidden): each MLP neuron's gate row, up row and down column, unit length."""
    mlp = block.mlp
    parts = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T]
    return F.normalize(torch.cat([p.detach().float() for p in parts], dim=1), dim=1)


def weight_matching(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(perm, mean cosine as is, mean cosine aligned): perm maximizes sum_i <a_i, b_perm[i]>.
    a, b: (neurons, features), rows unit length."""
    from scipy.optimize import linear_sum_assignment

    similarity = a @ b.T
    rows, cols = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    perm = torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
    return perm, float(similarity.diagonal().mean()), float(similarity[torch.arange(len(perm)), perm].mean())


def permutation_alignment(model: nn.Module) -> list[dict]:
    """[{"blocks": (l, l+1), "cosine": as is, "aligned": after weight matching}] for adjacent blocks
    with gated MLPs (gate_proj, up_proj, down_proj); [] for other architectures."""
    blocks = [b for b in blocks_of(model) if all(hasattr(getattr(b, "mlp", None), n)
                                                for n in ("gate_proj", "up_proj", "down_proj"))]
    rows = []
    for i in range(len(blocks) - 1):
        _, plain, aligned = weight_matching(neuron_vectors(blocks[i]), neuron_vectors(blocks[i + 1]))
        rows.append({"blocks": [i, i + 1], "cosine": plain, "aligned": aligned})
    return rows
