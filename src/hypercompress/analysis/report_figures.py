"""The analysis report's PNGs (matplotlib, headless): spectra, rate-distortion, flow, importance."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_figures(result: dict, folder: Path) -> dict[str, str]:
    """{figure key: file name} of the PNGs written into `folder`; each names its protocol."""
    plt = _pyplot()
    caption = result["protocol"]
    names = {}

    def save(fig, key):
        fig.text(0.01, 0.005, caption, fontsize=6, ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(folder / f"{key}.png", dpi=110)
        plt.close(fig)
        names[key] = f"{key}.png"

    weights = result["weights"]
    fig, ax = plt.subplots(figsize=(7, 4))
    step = max(1, len(weights) // 12)
    for row in weights[::step]:
        sigma = row["singular_values"]
        ax.plot(range(1, len(sigma) + 1), (sigma / sigma[0]).tolist(), lw=0.8, label=row["module"])
    ax.set(xscale="log", yscale="log", xlabel="index", ylabel="singular value / largest",
           title="Spectra of the weights (every layer in the tables; a sample drawn)")
    ax.legend(fontsize=5, ncol=2)
    save(fig, "spectra")

    rd = result["rate_distortion"]
    if rd:
        cols = min(3, len(rd))
        rows = math.ceil(len(rd) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
        for ax, (layer, data) in zip(axes.flat, rd.items()):
            bits, error = zip(*data["bound"])
            ax.plot(bits, error, "k--", lw=1, label="Gaussian bound")
            for method, marker in (("RTN", "o"), ("GPTQ", "s"), ("SVD", "^")):
                pts = [(p["bits_per_weight"], p["relative_error"]) for p in data["points"] if p["method"] == method]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, ms=3, lw=0.8, label=method)
            ax.set(yscale="log", title=layer, xlabel="stored bits / weight", ylabel="relative output error")
            ax.title.set_fontsize(6)
            ax.legend(fontsize=5)
        for ax in list(axes.flat)[len(rd):]:
            ax.axis("off")
        save(fig, "rate_distortion")

    flow = result["flow"]
    fig, left = plt.subplots(figsize=(7, 3.5))
    blocks = [r["block"] for r in flow]
    left.bar(blocks, [r["influence"] if r["influence"] == r["influence"] else 0 for r in flow], color="tab:blue")
    left.set(xlabel="block", ylabel="block influence (1 - cos)", title="Information flow")
    right = left.twinx()
    right.plot(blocks, [r["lens_nll"] for r in flow], "r.-")
    right.set_ylabel("logit-lens NLL (nats/token)", color="tab:red")
    save(fig, "flow")

    fisher = result["fisher"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    items = list(fisher.items())
    ax.plot(range(len(items)), [v["per_weight"] for _, v in items], ".", ms=3, label="Fisher per weight")
    sens = result.get("sensitivity") or {}
    if sens:
        three = [(i, s.get("w3g64")) for i, (n, _) in enumerate(items) if (s := sens.get(n))]
        three = [(i, v) for i, v in three if v is not None]
        if three:
            ax2 = ax.twinx()
            ax2.plot(*zip(*three), "r.", ms=3)
            ax2.set(yscale="log", ylabel="planner KL at w3g64 (nats)")
    ax.set(yscale="log", xlabel="linear layer (module order)", ylabel="Fisher / weight", title="Importance")
    save(fig, "importance")
    return names
