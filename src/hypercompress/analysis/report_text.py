"""The analysis report's Markdown (report.md)."""

from __future__ import annotations


def _fmt(value, spec: str = "{:.4g}") -> str:
    return "-" if value is None or value != value else spec.format(value)


def markdown(result: dict, figures: dict[str, str]) -> str:
    """report.md: the protocol, one table per section, the figures linked."""
    lines = ["# Model analysis", "", f"- measured on: {result['protocol']}",
             "- seconds per section: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()), ""]

    lines += ["## Weights", "", f"![spectra]({figures['spectra']})", "",
              "Effective rank: exp of the entropy of the normalized singular values (Roy & Vetterli 2007); "
              "stable rank: ||W||_F^2 / ||W||_2^2; kurtosis 3 for a Gaussian; code entropy: empirical "
              "order-0 entropy of the stored codes (the lossless bound per code) next to the code width.", "",
              "| module | shape | effective rank | stable rank | kurtosis | max/median | code bits | code entropy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["weights"]:
        codes = r.get("code_entropy") or {}
        lines.append(f"| {r['module']} | {r['shape'][0]}x{r['shape'][1]} | {r['effective_rank']:.1f} / "
                     f"{r['full_rank']} | {r['stable_rank']:.2f} | {_fmt(r['kurtosis'], '{:.2f}')} | "
                     f"{r['max_over_median']:.1f} | {codes.get('bits', '-')} | {_fmt(codes.get('entropy_bits'), '{:.3f}')} |")

    lines += ["", "## Sensitivity and importance", "", f"![importance]({figures['importance']})", "",
              "planner KL: KL(original || model with only that module quantized) on the first window's 256 "
              "tokens, the planner's own measure, per option; per bit removed: KL at w3g64 / (16 - 3.5) "
              "(w3g64 stores 3.5 bits a weight); Fisher: the empirical diagonal Fisher information of the "
              "module's weights on the calibration windows.", "",
              "| module | KL w2g64 | KL w3g64 | KL w4g64 | KL / bit removed (w3g64) | Fisher | Fisher / weight |",
              "|---|---|---|---|---|---|---|"]
    sens = result.get("sensitivity") or {}
    for name in dict.fromkeys(list(sens) + list(result["fisher"])):
        s, f = sens.get(name, {}), result["fisher"].get(name, {})
        per_bit = s.get("w3g64") / 12.5 if s.get("w3g64") is not None else None
        lines.append(f"| {name} | {_fmt(s.get('w2g64'))} | {_fmt(s.get('w3g64'))} | {_fmt(s.get('w4g64'))} | "
                     f"{_fmt(per_bit)} | {_fmt(f.get('fisher'))} | {_fmt(f.get('per_weight'))} |")

    if result["rate_distortion"]:
        lines += ["", "## Rate-distortion against the Gaussian bound", "",
                  f"![rate-distortion]({figures['rate_distortion']})", "",
                  "Distortion: relative output error ||(W - W') X^T||^2 / ||W X^T||^2 on the calibration inputs "
                  "of the layer; bits: as stored (codes, scales, zero points; float16 factors). Bound: a Gaussian "
                  "source with the spectrum of W C^(1/2), C = X^T X, reverse water-filling (Cover & Thomas, thm "
                  "10.3.3); excess bits = stored bits - the bound's bits at the method's distortion (the bits the "
                  "method spends above what an ideal vector quantizer needs on that Gaussian model).", "",
                  "| layer | method | setting | bits / weight | relative error | bound's error at those bits | "
                  "excess bits |", "|---|---|---|---|---|---|---|"]
        for layer, data in result["rate_distortion"].items():
            for p in data["points"]:
                lines.append(f"| {layer} | {p['method']} | {p['setting']} | {p['bits_per_weight']:.3f} | "
                             f"{p['relative_error']:.4g} | {p['bound_error']:.4g} | {p['excess_bits']:+.2f} |")

    lines += ["", "## Information flow", "", f"![flow]({figures['flow']})", "",
              "Block influence: 1 - mean cosine between the residual stream entering and leaving the block "
              "(ShortGPT, arXiv:2403.03853; the last block's output is only seen after the final norm: -); "
              "logit lens: next-token NLL when the final norm and head read the stream after the block.", "",
              "| block | influence | logit-lens NLL |", "|---|---|---|"]
    lines += [f"| {r['block']} | {_fmt(r['influence'])} | {r['lens_nll']:.3f} |" for r in result["flow"]]
    lines += _symmetry(result.get("symmetry") or {}) + _topology(result.get("topology"))
    return "\n".join(lines) + "\n"


def _symmetry(symmetry: dict) -> list[str]:
    lines = ["", "## Symmetries", ""]
    rotation = symmetry.get("rotation")
    if rotation:
        lines += ["Residual-stream rotation (randomized Hadamard, methods/rotation.py; readers with their RMSNorm "
                  "scale folded in, as the rotation folds it): mean over blocks.", "",
                  "| what | kurtosis before | after | max/median before | after |", "|---|---|---|---|---|"]
        for key, label in (("readers", "weights reading the stream (q, k, v, gate, up)"),
                           ("writers", "weights writing it (o, down)"), ("stream", "the stream itself (hidden states)")):
            b, a = rotation[key]["before"], rotation[key]["after"]
            lines.append(f"| {label} | {b['kurtosis']:.2f} | {a['kurtosis']:.2f} | {b['max_over_median']:.1f} | "
                         f"{a['max_over_median']:.1f} |")
    else:
        lines.append("Residual-stream rotation: not applicable (not an RMSNorm llama-like model).")
    perm = symmetry.get("permutation") or []
    if perm:
        lines += ["", "MLP neuron permutations, weight matching of adjacent blocks (Git Re-Basin; Hungarian "
                  "algorithm on the cosine of [gate row, up row, down column]): mean cosine of matched neurons.", "",
                  "| blocks | as is | aligned |", "|---|---|---|"]
        lines += [f"| {p['blocks'][0]}-{p['blocks'][1]} | {p['cosine']:.4f} | {p['aligned']:.4f} |" for p in perm]
    return lines


def _topology(topology: dict | None) -> list[str]:
    if not topology:
        return ["", "## Topology", "", "Not measured (no gated-MLP blocks)."]
    return ["", "## Topology (a curiosity, not a compression claim)", "",
            f"Persistent homology (ripser) of block {topology['block']}'s MLP activations: {topology['points']} "
            f"tokens, top {topology['dims']} principal directions, unit median distance; bars longer than "
            f"{topology['threshold']}: H0 {topology['h0_bars']}, H1 {topology['h1_bars']}; longest H1 bars "
            + ", ".join(f"{v:.3f}" for v in topology["h1_longest"]) + f"; {topology['seconds']} s."]
