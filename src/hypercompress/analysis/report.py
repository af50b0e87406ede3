"""`analyze_windows(model, samples, out=DIR)`: where a model's bits go, written as report.md + PNGs + JSON
(hypercompress.analyze, analysis/public.py, loads the model and draws the windows first).

Sections: weight statistics (weights.py), the planner's sensitivity and Fisher importance
(planning.mixed_bits.plan_bits, flow.fisher_importance), per-layer rate-distortion against the Gaussian bound
(layer_rd.py), information flow (flow.block_flow). Every figure and table names the text, the
windows and the dtype it was measured on (`protocol`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..arch import block_linear_names, blocks_of
from ..storage.atomic import atomic_directory, refuse_existing
from ..errors import UserError
from .flow import block_flow, fisher_importance
from .layer_rd import rate_distortion_report
from .symmetry import permutation_alignment, rotation_outliers
from .topology import activation_cloud, persistence
from .weights import weight_report

Progress = Callable[[str, int, int], None]  # (section, done, total)


def default_rd_layers(model: nn.Module) -> list[str]:
    """The linears of the first, middle and last blocks (the per-layer GPTQ runs cost seconds each)."""
    count = len(blocks_of(model))
    names = block_linear_names(model)
    per_block = len(names) // max(count, 1)
    chosen = sorted({0, count // 2, count - 1}) if count else []
    modules = dict(model.named_modules())  # GPT-2's Conv1D layers are not measured here
    return [n for i in chosen for n in names[i * per_block:(i + 1) * per_block] if isinstance(modules[n], nn.Linear)]


def analyze_windows(model: nn.Module, samples: torch.Tensor, out: str | Path | None = None, *, text_name: str = "calibration text",
            rd_layers: list[str] | None = None, sensitivity: bool = True, device: str = "cpu",
            progress: Progress | None = None) -> dict:
    """The analysis report of `model` (float32) on calibration windows `samples` (N, T) token ids.

    Returns {"protocol", "weights", "sensitivity", "fisher", "rate_distortion", "flow", "symmetry",
    "topology", "seconds"};
    with `out`, writes report.md, analysis.json and spectra.png / rate_distortion.png / flow.png /
    importance.png into that folder (written whole or not at all). `rd_layers`: the linears measured
    against the bound (default: default_rd_layers); `sensitivity`: run the planner's per-module KL
    probe (minutes on a CPU for a 135M model). Raises UserError for samples that are not (N, T)
    token ids with N >= 1 and T >= 2, or an unknown rd layer."""
    if out is not None:
        refuse_existing(out)  # before minutes of measuring
    if samples.dim() != 2 or samples.shape[0] < 1 or samples.shape[1] < 2:
        raise UserError(f"calibration windows of shape {tuple(samples.shape)}: need (windows >= 1, tokens >= 2)")
    model.eval()  # float32 as load_model gives it (a GGUF-loaded model refuses .float())
    modules = dict(model.named_modules())
    rd_layers = default_rd_layers(model) if rd_layers is None else rd_layers
    unknown = [n for n in rd_layers if not isinstance(modules.get(n), nn.Linear)]
    if unknown:
        raise UserError(f"--rd-layer {unknown[0]}: not a linear layer of this model; name one from `inspect`")
    say = progress or (lambda *_: None)
    timings, result = {}, {}
    protocol = (f"{text_name}: {samples.shape[0]} windows of {samples.shape[1]} tokens, float32 on {device}")

    def timed(key, fn):
        tick = time.perf_counter()
        result[key] = fn()
        timings[key] = round(time.perf_counter() - tick, 1)

    timed("weights", lambda: weight_report(model, lambda d, t: say("weight statistics", d, t)))
    if sensitivity:
        timed("sensitivity", lambda: _planner_sensitivity(model, samples, device, say))
    timed("fisher", lambda: fisher_importance(model, samples, device=device,
                                              progress=lambda d, t: say("Fisher importance", d, t)))
    timed("rate_distortion", lambda: rate_distortion_report(model, rd_layers, samples, device=device,
                                                            progress=lambda d, t: say("rate-distortion", d, t)))
    timed("flow", lambda: block_flow(model, samples, device=device))
    say("information flow", 1, 1)
    timed("symmetry", lambda: {"rotation": rotation_outliers(model, samples, device),
                               "permutation": permutation_alignment(model)})
    say("symmetries", 1, 1)
    timed("topology", lambda: _topology(model, samples, device))
    say("topology", 1, 1)
    result.update(protocol=protocol, seconds=timings)
    if out is not None:
        write_report(result, Path(out))
    return result


def _topology(model, samples, device) -> dict | None:
    """Persistent homology of the middle block's MLP activations (None without gated-MLP blocks)."""
    layers = blocks_of(model)
    if not layers or not hasattr(getattr(layers[0], "mlp", None), "down_proj"):
        return None
    block = len(layers) // 2
    cloud = activation_cloud(model, block, samples, device=device)
    return {"block": block, **persistence(cloud)}


def _planner_sensitivity(model, samples, device, say) -> dict:
    """{module: {option: KL}}: the planner's probe (planning.mixed_bits.plan_bits) on the first window's 256 tokens."""
    from ..planning.mixed_bits import option_label, plan_bits

    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    plan = plan_bits(model, 8.0, samples[:1, :256], 64, embedding, device=device,
                     progress=lambda d, t, phase="": say("planner whole-plan KL" if phase else "planner sensitivity", d, t))
    return {n: {option_label(o): kl for o, kl in s.items()} for n, s in plan.sensitivity.items()}


def _jsonable(result: dict) -> dict:
    weights = [{k: v for k, v in r.items() if k != "singular_values"} for r in result["weights"]]
    return {**result, "weights": weights}


def write_report(result: dict, out: Path) -> Path:
    """report.md, analysis.json and the figures into `out` (a new or empty folder), atomically."""
    from .report_figures import draw_figures
    from .report_text import markdown

    with atomic_directory(out) as tmp:
        figures = draw_figures(result, tmp)
        (tmp / "analysis.json").write_text(json.dumps(_jsonable(result), indent=2, default=_finite))
        (tmp / "report.md").write_text(markdown(result, figures))
    return out


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
