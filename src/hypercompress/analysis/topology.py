"""Persistent homology of a layer's activation cloud (ripser; a curiosity, not a compression claim).

The cloud: the MLP's hidden activations (the down_proj's inputs, (tokens, intermediate)) of one block
on calibration text, `points` tokens drawn with a seed, projected on their top `dims` principal
directions and scaled to unit median distance. ripser (Bauer 2021, "Ripser: efficient computation of
Vietoris-Rips persistence barcodes"; the scikit-tda package) gives the H0 and H1 barcodes; reported
are the number of bars that persist longer than `threshold` and the longest H1 bars, with the cost.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..arch import blocks_of


@torch.no_grad()
def activation_cloud(model: nn.Module, block: int, samples: torch.Tensor, points: int = 300, dims: int = 16,
                     seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """(points, dims) float64: block `block`'s MLP hidden activations, PCA-projected and scaled."""
    down = blocks_of(model)[block].mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu()))
    try:
        model.to(device)
        for chunk in samples.split(2):
            model(input_ids=chunk.to(device))
    finally:
        handle.remove()
    cloud = torch.cat(seen).double()
    pick = torch.randperm(cloud.shape[0], generator=torch.Generator().manual_seed(seed))[:points]
    cloud = cloud[pick] - cloud[pick].mean(0)
    _, _, v = torch.linalg.svd(cloud, full_matrices=False)
    projected = cloud @ v[:dims].T
    return projected / torch.cdist(projected, projected).median().clamp_min(1e-30)


def persistence(cloud: torch.Tensor, threshold: float = 0.1) -> dict:
    """{"h0_bars", "h1_bars", "h1_longest", "seconds", "points", "dims"}: bars persisting longer than
    `threshold` (in units of the median distance) and the three longest H1 bars' lengths."""
    from ripser import ripser

    tick = time.perf_counter()
    diagrams = ripser(cloud.numpy(), maxdim=1)["dgms"]
    lengths = [(d[:, 1] - d[:, 0]) for d in diagrams]
    finite = [l[l != float("inf")] for l in lengths]
    return {"h0_bars": int((lengths[0] > threshold).sum()), "h1_bars": int((finite[1] > threshold).sum()),
            "h1_longest": sorted(finite[1].tolist(), reverse=True)[:3], "threshold": threshold,
            "seconds": round(time.perf_counter() - tick, 2), "points": cloud.shape[0], "dims": cloud.shape[1]}
