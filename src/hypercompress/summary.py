"""The compression summary: what each branch (recipe stage, then the lossless stage) did to the size
and, when evaluation text is given, to the quality; written into the artifact as summary.json and
summary.md, shown by `inspect`.

Per branch: weights computed with (structural pruning lowers it), stored bytes, whole-model bits per
weight (stored bits / original parameters), ratio vs 16-bit, and perplexity / KL(original || model) /
top-1 on the evaluation windows, measured right after the branch.
Per module (every linear and embedding of the original): weights before and after (0 when its
block was removed), stored bytes, bits per original weight, ratio vs 16-bit. Blocks of one model
share their shapes, so a module is matched by name even after removed blocks renumber the rest;
the names left over at the end are the removed blocks' modules, listed as such.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import torch
from torch import nn

from .eval import evaluate_windows
from .layers.base import CompressedModule
from .modules import represented_weights
from .storage.reader import SUMMARY_JSON, SUMMARY_MD



class BranchMeter:
    """Measures a model after each branch against a frozen copy of the original."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, protocol: str, batch: int = 4,
                 device: str = "cpu"):
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False).to(device)
        self.windows, self.protocol, self.batch, self.device = windows, protocol, batch, device

    @torch.no_grad()
    def __call__(self, model: nn.Module, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Evaluates `model` on the meter's device (progress(windows done, windows) per batch); it
        goes back to the CPU, where stages run."""
        try:
            result = evaluate_windows(model.eval().to(self.device), self.windows, self.batch, self.teacher,
                                      progress=progress)
        finally:
            model.to("cpu")
        return {k: result[k] for k in ("ppl", "kl", "top1")}


def dense_weights(model: nn.Module) -> dict[str, int]:
    """name -> weights (weight + bias entries) of every nn.Linear / nn.Embedding, before compression."""
    return {name: sum(t.numel() for t in m.parameters(recurse=False)) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding))}


def module_rows(before: dict[str, int], model: nn.Module) -> list[dict[str, Any]]:
    """One row per module of `before` (dense_weights of the original) in the compressed `model`."""
    embedding = model.get_input_embeddings()
    shared = getattr(embedding, "weight", None)  # a dense embedding's table, which a tied head shares
    rows, removed = [], []
    for name, weights in before.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            removed.append(name)
            continue
        if isinstance(module, CompressedModule):
            after, kind, bits = represented_weights(module.layout()), module.kind, module.storage_bits()
        else:
            after = sum(t.numel() for t in module.parameters(recurse=False))
            tied = module is not embedding and shared is not None and getattr(module, "weight", None) is shared
            kind, bits = ("tied (stored with the embedding)" if tied else "dense"), (0 if tied else 16 * after)
        rows.append(_module_row(name, kind, weights, after, bits))
    for name in removed:
        rows.append(_module_row(name, "removed (its block was dropped)", before[name], 0, 0))
    return rows


def _module_row(name: str, kind: str, before: int, after: int, bits: int) -> dict[str, Any]:
    return {"module": name, "kind": kind, "weights_before": before, "weights_after": after, "bytes": bits // 8,
            "bits_per_weight": bits / before if before else 0.0,
            "ratio_vs_16bit": 16 * before / bits if bits else None}


def branch_rows(stages: list[dict[str, Any]], params: int, baseline: dict[str, Any] | None,
                safetensors_bytes: int, lossless: int | None,
                earlier: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per branch: the original, each stage, and the lossless stage when it ran. A model
    compressed by earlier calls (`earlier`: {"recipe": their methods, "weights", "storage_bits"} as
    it was loaded) gets a row for them, which `baseline` (measured on the model as loaded) belongs to;
    the original's quality is then not known here."""
    def row(branch: str, weights: int, bits: int, quality: dict[str, Any] | None) -> dict[str, Any]:
        return {"branch": branch, "weights": weights, "bytes": bits // 8, "bits_per_weight": bits / params,
                "ratio_vs_16bit": 16 * params / bits, **{k: (quality or {}).get(k) for k in ("ppl", "kl", "top1")}}

    rows = [row("original (16-bit)", params, 16 * params, None if earlier else baseline)]
    if earlier:
        rows.append(row(f"earlier calls: {' -> '.join(earlier['recipe'])}", earlier["weights"],
                        earlier["storage_bits"], baseline))
    for stage in stages:
        quality = {k: stage.get(k) for k in ("ppl", "kl", "top1")} if "ppl" in stage else None
        rows.append(row(f"{stage['stage']}: {stage['method']}", stage["weights"], stage["storage_bits"], quality))
    if lossless:
        last = rows[-1]
        rows.append(row(f"lossless (zstd {lossless})", last["weights"], 8 * safetensors_bytes,
                        {k: last[k] for k in ("ppl", "kl", "top1")}))
    return rows


def documents(summary: dict[str, Any]) -> dict[str, str]:
    """summary.json and summary.md for the artifact directory."""
    return {SUMMARY_JSON: json.dumps(summary, indent=2, sort_keys=True) + "\n", SUMMARY_MD: markdown(summary)}


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Compression summary: {summary['model']}", "",
             f"- recipe: `{json.dumps(summary['recipe'])}`",
             f"- quality protocol: {summary.get('protocol') or 'not measured (no --eval text)'}", "",
             "| branch | weights | bytes | bpw | ratio vs 16-bit | ppl | KL | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["branches"]:
        quality = [f"{r[k]:.4g}" if r.get(k) is not None else "n/a" for k in ("ppl", "kl", "top1")]
        lines.append(f"| {r['branch']} | {r['weights']:,} | {r['bytes']:,} | {r['bits_per_weight']:.4f} | "
                     f"{r['ratio_vs_16bit']:.2f}x | " + " | ".join(quality) + " |")
    if summary.get("kv_cache_bytes_per_token"):
        kv = summary["kv_cache_bytes_per_token"]
        lines += ["", f"KV cache per token ({kv['dtype']} cache, measured): {kv['before']:,.0f} -> "
                      f"{kv['after']:,.0f} bytes"]
    if summary.get("flops_per_token"):
        flops = summary["flops_per_token"]
        lines += ["", f"FLOPs per token (context {flops['context']}): {flops['before']:,} -> {flops['after']:,}"]
    if summary.get("modules"):
        lines += ["", "| module | kind | weights before | weights after | bytes | bpw | ratio vs 16-bit |",
                  "|---|---|---|---|---|---|---|"]
        for r in summary["modules"]:
            ratio = f"{r['ratio_vs_16bit']:.2f}x" if r["ratio_vs_16bit"] else "n/a"
            lines.append(f"| {r['module']} | {r['kind']} | {r['weights_before']:,} | {r['weights_after']:,} | "
                         f"{r['bytes']:,} | {r['bits_per_weight']:.4f} | {ratio} |")
    return "\n".join(lines) + "\n"
