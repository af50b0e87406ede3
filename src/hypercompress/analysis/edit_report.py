"""The edited model as an artifact, with its report (edit.md, edit.json) stored and hashed inside it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

EDIT_JSON, EDIT_MD = "edit.json", "edit.md"


def save_edited(model: nn.Module, tokenizer: Any, out: str | Path, report: dict, *, source: str,
                source_manifest: dict | None = None) -> Path:
    """Write `model` (edited in place by analysis.edit.erase_concept) as an artifact at `out`, atomically.

    A compressed source keeps its recipe, original parameter count and lossless level (its stored
    kinds were edited in their form); a dense source becomes an artifact of float16 tensors. The
    report goes into the manifest (`edit`) and into edit.md / edit.json."""
    from ..storage.artifact import save
    from ..modules import count_params

    manifest = source_manifest or {}
    entry = {"method": f"edit:{report['method']}", "directions": len(report["steps"]),
             "layers": [s["layer"] for s in report["steps"]]}
    lossless = (manifest.get("lossless") or {}).get("level")
    documents = lambda _size: {EDIT_JSON: json.dumps(json_safe(report), indent=2) + "\n",  # noqa: E731
                               EDIT_MD: markdown(report, source)}
    return save(model, tokenizer, out, recipe=list(manifest.get("recipe", [])) + [entry],
                original_params=manifest.get("original_params") or count_params(model),
                extra={"source_model": source, "edit": _compact(report)}, lossless=lossless, documents=documents)


def json_safe(value):
    """JSON without NaN/inf (they become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _compact(report: dict) -> dict:
    """The headline numbers the manifest keeps (edit.json has the rest)."""
    worst = max(report["layers"], key=lambda r: r["probe_after"])
    out = {"method": report["method"], "protocol": report["protocol"], "stopped": report["stopped"],
           "chance": report["chance"], "chance_bound": report["chance_bound"],
           "best_probe_before": max(r["probe_before"] for r in report["layers"]),
           "best_probe_after": worst["probe_after"], "behaviour": {k: report["behaviour"][k] for k in ("before", "after")},
           "unrelated_kl": report["unrelated"]["after"]["kl"],
           "heldout_kl": report["heldout"]["after"]["kl"] if report["heldout"] else None}
    return json_safe(out)


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows of the headline table."""
    b, a = report["behaviour"]["before"], report["behaviour"]["after"]
    best = lambda key: max(r[key] for r in report["layers"])  # noqa: E731
    rows = [("best held-out probe accuracy over layers", _num(best("probe_before"), 3), _num(best("probe_after"), 3)),
            ("concept preference p(S_c)/(p(S_c)+p(S_n))", _num(b["preference"]), _num(a["preference"])),
            ("NLL of the concept's own tokens (nats)", _num(b["marker_nll"]), _num(a["marker_nll"])),
            ("NLL of held-out concept lines", _num(b["concept_nll"]), _num(a["concept_nll"])),
            ("NLL of held-out contrast lines", _num(b["contrast_nll"]), _num(a["contrast_nll"]))]
    for name in ("unrelated", "heldout"):
        part = report.get(name)
        if part:
            rows.append((f"perplexity, {name} text", _num(part["before"]["ppl"], 3), _num(part["after"]["ppl"], 3)))
            rows.append((f"KL(original || edited), {name} text", "0", _num(part["after"]["kl"], 5)))
            rows.append((f"top-1 agreement, {name} text", "1", _num(part["after"]["top1"], 4)))
    return rows


def markdown(report: dict, source: str) -> str:
    """edit.md: protocol, headline table, per-layer probes, the directions taken, how each kind was edited."""
    tokens = report["behaviour"]["tokens"]
    lines = [f"# Concept edit of {source} ({report['method']})", "",
             f"- protocol: {report['protocol']}",
             f"- chance: {report['chance']:.3f} (at chance: <= {report['chance_bound']:.3f}, two standard errors)",
             f"- stopped: {report['stopped']}; KL budget {report['kl_budget']} nats/token on the unrelated text",
             f"- distinctive tokens: concept {tokens['concept_count']} ({', '.join(map(repr, tokens['concept'][:12]))}), "
             f"contrast {tokens['contrast_count']} ({', '.join(map(repr, tokens['contrast'][:12]))})", "",
             "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {m} | {b} | {a} |" for m, b, a in summary_rows(report)]
    lines += ["", "| direction | fitted at | CV probe accuracy there | KL on unrelated text after |", "|---|---|---|---|"]
    lines += [f"| {s['direction']} | {s['label']} | {s['cv_accuracy']:.3f} | {s['unrelated_kl']:.5f} |"
              for s in report["steps"]]
    lines += ["", "| layer | probe before | probe after | separation (Cohen's d) before | after |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['probe_before']:.3f} | {r['probe_after']:.3f} | {_num(r['separation_before'], 2)} | "
              f"{_num(r['separation_after'], 2)} |" for r in report["layers"]]
    lines += ["", "| edited modules | kinds | how | concept share left (max) |", "|---|---|---|---|"]
    lines += [f"| {g['modules']} | {', '.join(g['kinds'])} | {g['how']} | {g['max_left']:.2e} |" for g in report["modules"]]
    return "\n".join(lines) + "\n"
