"""Rate-distortion: perplexity against whole-model bits per weight for every run in a folder.

Points come from two kinds of JSON found under the folder (recursively):
- benchmark results (`{"title": ..., "rows": [{"label", "bits_per_weight", "ppl"}, ...]}`): one
  series per file;
- artifact summaries (`summary.json` written by `hypercompress compress`): each artifact's final
  branch is one point of the series "artifacts", when its quality was measured (--eval).
Both axes are logarithmic: bpw spans 16 down to a few hundredths, perplexity spans orders of
magnitude once a model breaks.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import replace_file
from ..errors import UserError

Series = dict[str, list[tuple[float, float, str]]]  # name -> (bpw, ppl, label)


def collect(folder: Path) -> Series:
    """Every (bpw, ppl, label) point under `folder`, grouped into series (anchor rows, copies of
    another table's rows, once)."""
    if not folder.is_dir():
        raise UserError(f"results folder not found: {folder}; pass a directory of results/*.json or artifacts")
    series: Series = {}
    for file in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (ValueError, OSError):
            continue
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("rows"), list):
            points = [(r["bits_per_weight"], r["ppl"], r.get("label", "")) for r in data["rows"]
                      if isinstance(r, dict) and _number(r.get("bits_per_weight")) and _number(r.get("ppl"))
                      and "anchor" not in r.get("label", "")]  # anchors repeat another table's row
            if points:
                series[data.get("title") or file.stem] = points
        elif file.name == "summary.json" and isinstance(data.get("branches"), list) and data["branches"]:
            last = data["branches"][-1]
            if _number(last.get("ppl")):
                series.setdefault("artifacts", []).append((last["bits_per_weight"], last["ppl"], file.parent.name))
    if not series:
        raise UserError(f"no results with bits_per_weight and ppl under {folder}; run a benchmark or "
                        "compress with --eval first")
    return series


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def plot(series: Series, out: Path, title: str = "Rate-distortion: perplexity vs bits per weight") -> Path:
    """Write the PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6), dpi=120)
    for name, points in series.items():
        points = sorted(points)
        axes.plot([p[0] for p in points], [p[1] for p in points], "o", label=name, alpha=0.8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("bits per weight (whole model, all stored bytes x 8 / original parameters)")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, lambda tmp: figure.savefig(tmp, format=out.suffix.lstrip(".") or None))
    plt.close(figure)
    return out
