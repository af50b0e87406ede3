"""Per-layer weight statistics: spectrum, effective and stable rank, outliers, stored-code entropy."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.base import CompressedModule, linear_weight


def spectrum_stats(weight: torch.Tensor) -> dict:
    """Singular values and ranks of a weight (out, in), computed in float32.

    effective_rank: exp of the Shannon entropy of the normalized singular values (Roy & Vetterli,
    "The effective rank: a measure of effective dimensionality", EUSIPCO 2007); stable_rank:
    ||W||_F^2 / ||W||_2^2 (Rudelson & Vershynin 2007). Both lie in [1, min(out, in)]."""
    sigma = torch.linalg.svdvals(weight.detach().float())
    p = sigma / sigma.sum().clamp_min(1e-30)
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {"singular_values": sigma, "effective_rank": math.exp(entropy),
            "stable_rank": float((sigma ** 2).sum() / (sigma[0] ** 2).clamp_min(1e-30)),
            "full_rank": min(weight.shape)}


def outlier_stats(weight: torch.Tensor) -> dict:
    """kurtosis: E[(w - mean)^4] / var^2 of the entries (3 for a Gaussian; outlier-heavy layers are
    far above); max_over_median: max |w| / median |w|."""
    w = weight.detach().double().flatten()
    centred = w - w.mean()
    var = float((centred ** 2).mean())
    absolute = w.abs()
    return {"kurtosis": float((centred ** 4).mean()) / var ** 2 if var > 0 else float("nan"),
            "max_over_median": float(absolute.max() / absolute.median().clamp_min(1e-30))}


def code_entropy(module: CompressedModule) -> dict | None:
    """Empirical entropy (bits per code) of a quantized module's stored codes next to its code width:
    the lossless bound of coding the codes one at a time (order-0), which the zstd stage is measured
    against. None for stored kinds without codes."""
    from ..layers.quant_linear import QuantLinear
    from ..layers.quant_embedding import QuantEmbedding
    from ..formats.packing import unpack_codes

    if not isinstance(module, (QuantLinear, QuantEmbedding)):
        return None
    count = module.out_features * module.in_features
    codes = unpack_codes(module.qweight.reshape(-1), module.bits, count)
    counts = torch.bincount(codes.flatten().long(), minlength=1 << module.bits).double()
    p = counts[counts > 0] / counts.sum()
    return {"bits": module.bits, "entropy_bits": float(-(p * p.log2()).sum()), "codes": int(counts.sum())}


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: weight (out, in)} of every linear layer (stored kinds as the weights they compute with)
    and the input embedding (vocab, dim), in the model's module order."""
    found = {}
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding or isinstance(module, (nn.Linear, CompressedModule)):
            if module is model.get_output_embeddings() and getattr(module, "weight", None) is getattr(
                    embedding, "weight", object()):
                continue  # a tied head is the embedding
            if isinstance(module, CompressedModule):
                if hasattr(module, "dense_weight"):  # a stored kind without one matrix is passed over
                    found[name] = module.dense_weight(torch.float32).detach()
            else:
                found[name] = linear_weight(module)
    return found


def weight_report(model: nn.Module, progress=None) -> list[dict]:
    """One row per layer of layer_weights(model): shape, ranks, outliers and, for quantized stored
    modules, the code entropy; the singular values are kept for the spectra figure."""
    rows = []
    weights = layer_weights(model)
    modules = dict(model.named_modules())
    for done, (name, weight) in enumerate(weights.items()):
        row = {"module": name, "shape": list(weight.shape), **spectrum_stats(weight), **outlier_stats(weight)}
        entropy = code_entropy(modules[name]) if isinstance(modules[name], CompressedModule) else None
        if entropy:
            row["code_entropy"] = entropy
        rows.append(row)
        if progress:
            progress(done + 1, len(weights))
    return rows

