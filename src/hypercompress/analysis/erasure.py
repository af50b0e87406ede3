"""Concept erasure folded into the weights that write to the residual stream (no runtime hook).

An erasure is the affine map of a residual vector x (hidden,)
    r(x) = x - L R (x - b),        L: (hidden, k), R: (k, hidden), b: (hidden,) or None,
with A = L R a projection (A A = A) of rank k. Two fits:
- "leace": LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form"),
  fitted by the `concept-erasure` package: the least-squares-smallest change after which no linear
  predictor of the concept beats a constant (class means made equal), with b the features' mean.
- "ablation": directional ablation (Arditi et al. 2024, "Refusal in language models is mediated by
  a single direction"): A = u u^T with u the unit difference of the class means and b the mean
  (concept-erasure's "orth" method): the component along u is set to its mean value.
Both are fitted on token-level residual vectors (each token labelled by its line), the vectors the
edit acts on.

Folding: the residual stream at every layer is the sum of what the embeddings and the blocks' output
projections write, so applying M = I - A to each writer makes every residual vector satisfy A h = 0:
the concept's coordinate is zero at every layer and position, exactly (in real arithmetic), and the
class means, equal along it, stay equal. Only the linear part is folded: the affine offset A b (the
fitted layer's mean) written at every layer would be far from the early layers' scale (in a trial on
SmolLM2 it took KL on unrelated text from 0.08 to 6.1 nats/token). Blocks read a normalised copy of the
residual, so they see the edited stream; nothing else changes. With tied embeddings the lm_head
reads the edited table: its logits lose the erased part (h . A e_v).

Stored kinds keep their form: dense and low-rank writers are edited exactly (a low-rank layer's U
becomes M U); a quantized writer's edited weight is rounded back onto its own grid (its scales and
zero points kept, codes re-chosen), so A is only as exact as that grid: `fold_erasure` reports, per
module, the share of the concept coordinate the rounding left (|A W'| / |A W|).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import residual_writer_names
from ..errors import UserError

METHODS = ("leace", "ablation")


@dataclass
class Erasure:
    """r(x) = x - left @ right @ (x - bias); left (hidden, k), right (k, hidden) float64."""

    left: torch.Tensor
    right: torch.Tensor
    bias: torch.Tensor | None
    method: str

    def projection(self) -> torch.Tensor:
        """A = L R: (hidden, hidden) float64."""
        return self.left @ self.right

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., hidden) -> r(x), same dtype."""
        x64 = x.double()
        delta = x64 - self.bias if self.bias is not None else x64
        return (x64 - delta @ self.right.T @ self.left.T).to(x.dtype)


def erasure_fitter(hidden: int, method: str = "leace"):
    """A streaming fitter (concept-erasure's LeaceFitter: running means and covariances) for `method`;
    feed it with `.update(x (n, hidden), z (n, 1) of 0/1)`, then call erasure_from. Raises UserError
    for an unknown method."""
    if method not in METHODS:
        raise UserError(f"erasure method '{method}': one of {', '.join(METHODS)}")
    from concept_erasure import LeaceFitter

    if method == "leace":  # the package's tolerance on the whitened cross-covariance
        return LeaceFitter(hidden, 1, method="leace", dtype=torch.float64)
    # "orth" works in raw units, where the package's absolute 0.01 would drop small-scale concepts
    return LeaceFitter(hidden, 1, method="orth", dtype=torch.float64, svd_tol=1e-12)


def erasure_from(fitter, method: str) -> Erasure:
    """The erasure a fitter's statistics give: LEACE's oblique projection, or (ablation) the orthogonal
    projection onto the difference of the class means with the component set to its mean.
    Raises UserError when the fitter saw one class only."""
    mean_z = float(fitter.mean_z.reshape(-1)[0]) if fitter.n else 0.0
    if not 0 < mean_z < 1:
        raise UserError("the concept examples hold one class only; pass both concept and contrast examples")
    eraser = fitter.eraser
    return Erasure(eraser.proj_left.double(), eraser.proj_right.double(),
                   None if eraser.bias is None else eraser.bias.double(), method)


def fit_erasure(features: torch.Tensor, labels: torch.Tensor, method: str = "leace") -> Erasure:
    """The erasure of a binary concept. features: (N, hidden), labels: (N,) of 0/1, both classes present.

    Raises UserError for an unknown method or a single class; ValueError for mismatched shapes."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}: need (N, hidden), (N,)")
    fitter = erasure_fitter(features.shape[1], method)
    fitter.update(features.double(), labels.double()[:, None])
    return erasure_from(fitter, method)


@torch.no_grad()
def fold_erasure(model: nn.Module, erasure: Erasure) -> list[dict]:
    """Apply `erasure` to every residual writer of `model` in place (arch.residual_writer_names).

    Returns one row per edited module: {"module", "kind", "how", "left"}, where "left" is
    |A W'| / |A W| (0 for exact edits up to float64 rounding; the grid's share for quantized kinds).
    Raises UserError naming a writer stored in a kind this edit cannot keep (sparse, LoRA, generated).
    """
    embeddings, writers = residual_writer_names(model)
    projection = erasure.projection()
    keep = torch.eye(projection.shape[0], dtype=torch.float64) - projection
    rows = []
    for name in embeddings:
        rows.append(_edit_table(name, model.get_submodule(name), keep, projection))
    for name in writers:
        rows.append(_edit_writer(name, model.get_submodule(name), keep, projection))
    return rows


def _refuse_kind(name: str, module: nn.Module) -> UserError:
    kind = getattr(module, "kind", type(module).__name__)
    return UserError(f"{name} is stored as '{kind}', which an edit cannot keep in its form; edit the source "
                     "model (dense, low-rank or quantized writers), then compress it")


def _left(projection: torch.Tensor, before: torch.Tensor, after: torch.Tensor, rows_are_residual: bool) -> float:
    """|A W'| / |A W| with W's residual axis first (rows_are_residual) or last."""
    b, a = (before, after) if rows_are_residual else (before.T, after.T)
    denominator = float((projection @ b.double()).norm())
    return float((projection @ a.double()).norm()) / denominator if denominator > 0 else 0.0


def _edit_writer(name: str, module: nn.Module, keep: torch.Tensor, projection: torch.Tensor) -> dict:
    """A writer W: (hidden, in) (Conv1D: (in, hidden)) becomes M W; its bias M b."""
    from ..layers.low_rank import LowRankLinear
    from ..layers.quant_linear import QuantLinear
    from ..layers.quant_embedding import QuantEmbedding

    if type(module).__name__ == "Conv1D":  # GPT-2: y = x W + b, W (in, hidden)
        before = module.weight.data.clone()
        module.weight.data.copy_((before.double() @ keep.T).to(before.dtype))
        how, left = "dense (Conv1D), exact", _left(projection, before, module.weight.data, False)
    elif isinstance(module, nn.Linear):
        before = module.weight.data.clone()
        module.weight.data.copy_((keep @ before.double()).to(before.dtype))
        how, left = "dense, exact", _left(projection, before, module.weight.data, True)
    elif isinstance(module, LowRankLinear):
        before = module.dense_weight(torch.float64)
        module.U.copy_((keep @ module.U.double()).to(module.U.dtype))
        how, left = "low-rank: U <- M U (float16 factors)", _left(projection, before, module.dense_weight(torch.float64), True)
    elif isinstance(module, QuantLinear) and not isinstance(module, QuantEmbedding):
        before = module.dense_weight(torch.float64)
        _requantize(module, keep @ before)
        how, left = "quantized: codes re-rounded on the layer's own grid", \
            _left(projection, before, module.dense_weight(torch.float64), True)
    else:
        raise _refuse_kind(name, module)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data.copy_((keep @ bias.data.double()).to(bias.dtype))
    refresh_fast_path(module)
    return {"module": name, "kind": getattr(module, "kind", "dense"), "how": how, "left": left}


def _edit_table(name: str, module: nn.Module, keep: torch.Tensor, projection: torch.Tensor) -> dict:
    """An embedding table E: (rows, hidden) becomes E M^T."""
    from ..layers.quant_embedding import QuantEmbedding

    def edited(table: torch.Tensor) -> torch.Tensor:
        return table.double() @ keep.T

    if isinstance(module, nn.Embedding):
        before = module.weight.data.clone()
        module.weight.data.copy_(edited(before).to(before.dtype))
        how, after = "dense, exact", module.weight.data
    elif isinstance(module, QuantEmbedding):
        before = module.dense_weight(torch.float64)
        _requantize(module, edited(before))
        how, after = "quantized: codes re-rounded on the table's own grid", module.dense_weight(torch.float64)
    else:
        raise _refuse_kind(name, module)
    refresh_fast_path(module)
    return {"module": name, "kind": getattr(module, "kind", "dense"), "how": how,
            "left": _left(projection, before, after, False)}


def _requantize(layer, weight: torch.Tensor) -> None:
    """Round `weight` (out, in) onto `layer`'s own grid (scales and zero points kept) and store the codes."""
    from ..formats.packing import pack_codes
    from ..layers.quant_linear import quantize_to_grid

    groups = layer.scales.shape[1]
    scale = layer.scales.double()[..., None]
    zero = layer._zero(torch.float64)
    zero_point = "float" if (not layer.symmetric and layer.zero_point == "float") else "int"
    grouped = weight.reshape(layer.out_features, groups, layer.group_size)
    codes = quantize_to_grid(grouped, scale, zero, layer.bits, zero_point)
    layer.qweight.copy_(pack_codes(codes.to(torch.uint8), layer.bits))


def refresh_fast_path(module: nn.Module) -> None:
    """A compressed module's kernel path was built from the old values: rebuild it for the same dtype."""
    fast = getattr(module, "_fast", None)
    if fast is not None and hasattr(module, "prepare_fast"):
        module.prepare_fast(getattr(fast, "dtype", torch.float32))
