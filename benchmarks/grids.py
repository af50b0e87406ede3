"""Non-uniform grids against the uniform one at (nearly) equal stored bits, on SmolLM2-135M.

    python benchmarks/grids.py [--windows 64] [--bits 2 3 4]     # -> results/grids.json + RESULTS.md

Each row rounds every block linear to nearest on one grid (no calibration, no training: the grid's
own quality) and measures WikiText-2 perplexity on the first `--windows` 512-token test windows
(bfloat16 on CPU) and KL / top-1 against the original. Grids, per group of g input columns:
- uniform: asymmetric min-max, integer zero point (RTN, what QuantLinear stores): b-bit codes,
  float16 scale, b-bit zero: b + (16 + b) / g bits per weight;
- nf: levels at the normal distribution's quantiles Phi^-1((k + 1/2) / 2^b), scaled to [-1, 1],
  times the group's float16 absmax (NormalFloat, Dettmers et al. 2023): b + 16 / g;
- lloyd: a codebook of 2^b levels learned per layer by Lloyd-Max (1-D k-means, from the nf levels,
  25 iterations) over the layer's absmax-normalized weights: b + 16 / g + 2^b x 16 / weights.
Bits are those the codes, scales, zeros and codebooks of such a layer store (the block linears
only; the embedding stays float16, so whole-model bpw is not the point here).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

from hypercompress.arch import block_linear_names  # noqa: E402
from hypercompress.sources.data import read_text, tokenize, windows  # noqa: E402
from hypercompress.eval import evaluate_windows, protocol_text, teacher_log_probs  # noqa: E402
from hypercompress.layers.quant_linear import dequantize, fit_grid, quantize_to_grid  # noqa: E402
from hypercompress.sources.models import load_model  # noqa: E402


def normal_levels(bits: int) -> torch.Tensor:
    levels = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(1 << bits) + 0.5) / (1 << bits))
    return levels / levels.abs().max()


def uniform(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, float]:
    rows, cols = weight.shape
    groups = weight.view(rows, cols // group, group)
    scale, zero = fit_grid(groups, bits, False, "int")
    out = dequantize(quantize_to_grid(groups, scale, zero, bits, "int"), scale, zero, "int")
    return out.reshape(rows, cols), bits + (16 + bits) / group


def nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[(values[..., None] - levels).abs().argmin(-1)]


def codebook(weight: torch.Tensor, bits: int, group: int, learned: bool) -> tuple[torch.Tensor, float]:
    rows, cols = weight.shape
    groups = weight.view(rows, cols // group, group)
    scale = groups.abs().amax(-1, keepdim=True).to(torch.float16).float().clamp_min(1e-8)
    normalized = groups / scale
    levels = normal_levels(bits)
    if learned:
        flat = normalized.reshape(-1)
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
        for _ in range(25):
            assign = (sample[:, None] - levels).abs().argmin(-1)
            sums = torch.zeros_like(levels).index_add_(0, assign, sample)
            counts = torch.bincount(assign, minlength=levels.numel()).float()
            levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
        levels = levels.to(torch.float16).float()
    out = nearest(normalized, levels) * scale
    extra = (1 << bits) * 16 / weight.numel() if learned else 0.0
    return out.reshape(rows, cols), bits + 16 / group + extra


GRIDS = {"uniform": lambda w, b, g: uniform(w, b, g), "nf": lambda w, b, g: codebook(w, b, g, False),
         "lloyd": lambda w, b, g: codebook(w, b, g, True)}


@torch.no_grad()
def apply_grid(model, grid: str, bits: int, group: int) -> float:
    """Every block linear rounded on `grid` in place; returns the mean stored bits per weight."""
    bits_total, weights = 0.0, 0
    for name in block_linear_names(model):
        layer = model.get_submodule(name)
        rounded, per_weight = GRIDS[grid](layer.weight.float(), bits, group)
        layer.weight.copy_(rounded.to(layer.weight.dtype))
        bits_total += per_weight * layer.weight.numel()
        weights += layer.weight.numel()
    return bits_total / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--test-text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2_test.txt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    teacher = loaded.model.eval()
    ids = tokenize(loaded.tokenizer, read_text(args.test_text))
    test = windows(ids, 512, args.windows)
    dtype = torch.bfloat16
    reference = copy.deepcopy(teacher).to(dtype)
    rows = [{"label": "original", "grid": "-", "linear_bpw": 16.0, **evaluate_windows(reference, test, 8)}]
    reference = teacher_log_probs(reference, test, 8)  # float32, ~100 MB per window
    for bits in args.bits:
        for grid, group in (("uniform", 64), ("nf", 64), ("lloyd", 64), ("lloyd", 48)):
            student = copy.deepcopy(teacher)
            bpw = apply_grid(student, grid, bits, group)
            result = evaluate_windows(student.to(dtype), test, 8, reference)
            rows.append({"label": f"{grid} w{bits} g{group}", "grid": grid, "bits": bits, "group_size": group,
                         "linear_bpw": bpw, **{k: result[k] for k in ("ppl", "kl", "top1")}})
            print(rows[-1], flush=True)
    write_json("grids", {
        "title": "Grids at equal stored bits: uniform vs NormalFloat vs a learned per-layer codebook (RTN)",
        "model": "smollm2-135m", "machine": machine(),
        "protocol": protocol_text("WikiText-2 raw test", 512, test.shape[0], ids.numel() // 512, dtype,
                                  "the uncompressed model", "cpu"),
        "script": "python benchmarks/grids.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
