"""Coarse-to-fine KAN compression of weight matrices, and the user-facing API.

    compressor = HierarchicalCompressor(num_levels=2, hidden_dims=(8, 8))
    compressed = compressor.compress(model.state_dict())
    model.load_state_dict(decompress_weights(compressed))

Each 2-D tensor with at least `min_size` entries is represented by `num_levels` KanFields: level 1
(spline grid `grid`) is fitted to the weights, level l+1 (grid doubled: finer functions) to what the
levels before it leave, each by Adam on the mean squared error over random batches of entries. Other
tensors are kept (float16). `compressed` holds only tensors and JSON-able metadata; its fields are
stored in float16 and every decompression computes from those, so what is saved is what is used.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from ...layers.kan.field import KanField, evaluate, field_from_layout, layout_of

def fit_levels(weight: torch.Tensor, num_levels: int, hidden_dims: tuple[int, ...], code_dim: int,
               grid: int, steps: int, lr: float, seed: int, device: str = "cpu",
               batch: int = 4096, on_step: Callable[[dict[str, float]], None] | None = None) -> nn.ModuleList:
    """Fit the hierarchy to weight (d_out, d_in), or to M matrices of one shape (M, d_out, d_in) at
    once (each its own fields; one Adam step updates all). Returns the levels as float16 KanFields
    with M copies (M = 1 for one matrix). on_step(values) after every Adam step: {"loss": mean over
    the M matrices of the squared error on the step's entries, "level": 1-based, "lr",
    "entries_per_second": matrix entries fitted per second (M x batch / step time)}."""
    generator = torch.Generator().manual_seed(seed)
    target = weight.float().to(device)
    target = target[None] if target.dim() == 2 else target
    residual = target.clone()
    d_out, d_in = target.shape[1:]
    levels = nn.ModuleList()
    for level in range(num_levels):
        torch.manual_seed(seed + level)
        field = KanField(d_out, d_in, code_dim, hidden_dims[min(level, len(hidden_dims) - 1)],
                         grid * 2 ** level, copies=target.shape[0]).to(device)
        field.init_codes(residual)
        optimizer = torch.optim.Adam(field.parameters(), lr=lr)
        for _ in range(steps):
            tick = time.perf_counter()
            flat = torch.randint(0, d_out * d_in, (min(batch, d_out * d_in),), generator=generator).to(device)
            i, j = flat // d_in, flat % d_in
            # the sum over copies of each copy's mean: every copy gets its own fit's gradient
            loss = (field.values(i, j) - residual[:, i, j]).pow(2).mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step({"loss": loss.item() / target.shape[0], "level": level + 1, "lr": lr,
                         "entries_per_second": target.shape[0] * i.numel() / (time.perf_counter() - tick)})
        field = field.half()
        with torch.no_grad():
            residual -= evaluate(field)
        levels.append(field.cpu())
    return levels


class HierarchicalCompressor:
    """KAN hierarchical compression of a state dict (see the module docstring)."""

    def __init__(self, num_levels: int = 2, hidden_dims: tuple[int, ...] = (8, 8), code_dim: int = 4,
                 grid: int = 4, steps: int = 200, lr: float = 1e-2, min_size: int = 1024, seed: int = 0,
                 device: str = "cpu"):
        if num_levels < 1 or not hidden_dims or min(hidden_dims) < 1 or code_dim < 1 or grid < 1:
            raise ValueError("num_levels, hidden_dims, code_dim and grid must be positive")
        self.num_levels, self.hidden_dims, self.code_dim, self.grid = num_levels, tuple(hidden_dims), code_dim, grid
        self.steps, self.lr, self.min_size, self.seed, self.device = steps, lr, min_size, seed, device

    def compress(self, state_dict: dict[str, torch.Tensor],
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """state_dict -> {"tensors": {name: {...}}, "meta": {...}}: KAN levels or kept float16 tensors."""
        names = list(state_dict)
        out: dict[str, Any] = {"format": "kan-hierarchical", "tensors": {}}
        for index, name in enumerate(names):
            tensor = state_dict[name]
            if tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel() >= self.min_size:
                levels = fit_levels(tensor, self.num_levels, self.hidden_dims, self.code_dim, self.grid,
                                    self.steps, self.lr, self.seed + index, self.device)
                out["tensors"][name] = {
                    "kind": "kan", "dtype": str(tensor.dtype).removeprefix("torch."),
                    "layout": [layout_of(f) for f in levels],
                    "state": {f"{l}.{k}": v for l, f in enumerate(levels) for k, v in f.state_dict().items()}}
            else:
                kept = tensor.detach().cpu()
                out["tensors"][name] = {"kind": "dense", "dtype": str(tensor.dtype).removeprefix("torch."),
                                        "value": kept.half() if kept.is_floating_point() else kept}
            if progress:
                progress(index + 1, len(names))
        return out


def decompress_weights(compressed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """compressed (from HierarchicalCompressor.compress) -> a state dict load_state_dict accepts."""
    if not isinstance(compressed, dict) or compressed.get("format") != "kan-hierarchical":
        raise ValueError("not a KAN-compressed state dict (expected HierarchicalCompressor.compress output)")
    state = {}
    for name, entry in compressed["tensors"].items():
        dtype = getattr(torch, entry["dtype"])
        if entry["kind"] == "dense":
            state[name] = entry["value"].to(dtype)
            continue
        fields = []
        for level, layout in enumerate(entry["layout"]):
            field = field_from_layout(layout)
            field.load_state_dict({k.split(".", 1)[1]: v for k, v in entry["state"].items()
                                   if k.split(".", 1)[0] == str(level)})
            fields.append(field)
        state[name] = evaluate(fields)[0].to(dtype)
    return state
