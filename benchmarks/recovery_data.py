"""Which data the recovery trains on: the share and size of the corpus the original writes (issue 27).

The size-target route with `--distill` (`hypercompress compress M --target-bpw T --distill`) trains
on the calibration windows mixed with a corpus the original writes itself. This benchmark runs that
command once per variant, side by side on one card, each with a `--set qat.KEY=VALUE` list, and
judges them on text none of them trained on: held-out validation text (the last ~10% of the
WikiText-2 validation file, cut at a heading; calibration gets the first ~90%) and the second
domain (Python standard-library docstrings, eval/domains.py). Never the test text.

Score of a variant = the mean, over the two held-out texts, of the relative NLL rise over the
original ((log ppl - log ppl_original) / log ppl_original); the lowest wins and becomes the
default (training/engine.recovery_defaults).

    python benchmarks/recovery_data.py split --valid valid.txt --head H.txt --tail T.txt
    python benchmarks/recovery_data.py run --model M.gguf --calib H.txt --heldout T.txt --device cuda \
        --work DIR --variant A= --variant B=qat.teacher_fraction=0.9 \
        --variant C=qat.teacher_fraction=0.9,qat.corpus_tokens=3000000
    python benchmarks/recovery_data.py report DIR/recovery_data.json   # -> results/recovery_data.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_cli import _cli, _machine  # noqa: E402

TEXTS = ("heldout", "docs")


def split(args) -> None:
    """Cut the validation text at the first heading line (" = Title = ") after `share` of its
    characters: head for calibration, tail held out."""
    text = Path(args.valid).read_text()
    start = int(len(text) * args.share)
    cut = next((i + 1 for i in range(start, len(text) - 3) if text[i] == "\n" and text[i + 1:i + 4] == " = "), None)
    if cut is None:
        raise SystemExit(f"no heading line after {args.share:.0%} of {args.valid}")
    Path(args.head).write_text(text[:cut])
    Path(args.tail).write_text(text[cut:])
    print(json.dumps({"head_chars": cut, "tail_chars": len(text) - cut}))


def _variants(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, _, sets = item.partition("=")
        out[name] = [s for s in sets.split(",") if s]
    return out


def run(args) -> None:
    from hypercompress.eval.domains import describe, stdlib_docs_text

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "docs.txt").write_text(stdlib_docs_text())
    texts = {"heldout": args.heldout, "docs": str(work / "docs.txt")}
    variants = _variants(args.variant)
    base = ["--device", args.device, "--no-keep"]
    started, procs = time.time(), {}
    for name, sets in variants.items():
        command = _cli("compress", args.model, "--target-bpw", args.target, "--distill", "--calib", args.calib,
                       "--device", args.device, "--seed", "0", "--train-tokens", str(args.train_tokens),
                       *[x for s in sets for x in ("--set", s)], "--out", str(work / name),
                       "--json", str(work / f"compress-{name}.json"))
        procs[name] = subprocess.Popen(command, stdout=open(work / f"log-{name}.txt", "w"), stderr=subprocess.STDOUT)
    for text, path in texts.items():
        subprocess.run(_cli("evaluate", args.model, "--data", path, *base, "--json", str(work / f"original-{text}.json")),
                       check=False)
    for proc in procs.values():
        proc.wait()
    evals = [subprocess.Popen(_cli("evaluate", str(work / name), "--data", path, "--teacher", args.model, *base,
                                   "--json", str(work / f"{name}-{text}.json")))
             for name in variants for text, path in texts.items()]
    for proc in evals:
        proc.wait()
    load = lambda f: json.loads((work / f).read_text()) if (work / f).exists() else None  # noqa: E731
    result = {"target": args.target, "train_tokens": args.train_tokens, "side_by_side": len(variants),
              "wall_seconds": round(time.time() - started, 1), "docs": describe(stdlib_docs_text()),
              "machine": _machine(args.commit), "original": {t: load(f"original-{t}.json") for t in TEXTS},
              "variants": {name: {"sets": sets, "compress": load(f"compress-{name}.json"),
                                  **{t: load(f"{name}-{t}.json") for t in TEXTS}} for name, sets in variants.items()}}
    (work / "recovery_data.json").write_text(json.dumps(result, indent=1, default=str))


def _rise(ppl: float | None, original: float | None) -> float | None:
    if not ppl or not original:
        return None
    return (math.log(ppl) - math.log(original)) / math.log(original)


def row_of(name: str, variant: dict, original: dict) -> dict:
    """One variant's measured row: held-out and second-domain perplexity, their rises, the score."""
    c = variant["compress"] or {}
    qat = next((s.get("training") for s in c.get("stages", []) if s.get("training")), {}) or {}
    rises = {t: _rise((variant[t] or {}).get("ppl"), (original[t] or {}).get("ppl")) for t in TEXTS}
    return {"variant": name, "sets": variant["sets"], "stored_bpw": c.get("bits_per_weight"),
            **{f"{t}_ppl": (variant[t] or {}).get("ppl") for t in TEXTS},
            **{f"{t}_kl": (variant[t] or {}).get("kl") for t in TEXTS},
            **{f"{t}_rise": rises[t] for t in TEXTS},
            "score": None if None in rises.values() else sum(rises.values()) / len(rises),
            "corpus_seconds": qat.get("corpus_seconds"), "tokens_seen": (qat.get("end_to_end") or {}).get("tokens"),
            "wall_seconds": c.get("wall_seconds")}


def report(paths: list[str]) -> None:
    """Turn run files into benchmarks/results/recovery_data.json and print its RESULTS.md section."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = [row_of(n, v, data["original"]) for n, v in data["variants"].items()]
        scored = [r for r in rows if r["score"] is not None]
        runs.append({"target": data["target"], "train_tokens": data["train_tokens"],
                     "side_by_side": data["side_by_side"], "machine": data["machine"],
                     "original": {f"{t}_ppl": (data["original"][t] or {}).get("ppl") for t in TEXTS},
                     "rows": rows, "winner": min(scored, key=lambda r: r["score"])["variant"] if scored else None})
    out = Path(__file__).resolve().parent / "results" / "recovery_data.json"
    data = {"title": "What the recovery trains on: the share and size of the original's own corpus (issue 27)",
            "runs": runs}
    out.write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(section(data)))


def section(data: dict) -> list[str]:
    """The RESULTS.md section of results/recovery_data.json."""
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    parts = [f"## {data['title']}", "",
             "- per variant: `hypercompress compress smollm2-135m --target-bpw T --distill --calib VALID_HEAD "
             "--device cuda --seed 0 --train-tokens N --set ...`, side by side on one card; then `hypercompress "
             "evaluate OUT --teacher smollm2-135m` on the held-out validation tail and on the second domain "
             "(`python benchmarks/recovery_data.py split` / `run` / `report`)",
             "- VALID_HEAD / tail: the WikiText-2 validation text cut at the first heading after 90% of it; "
             "the test text is not used. Score: mean relative NLL rise over the original on the two texts "
             "(lowest wins; the winner is the `--distill` default on CUDA)", ""]
    for run in data["runs"]:
        m, o = run["machine"] or {}, run["original"]
        parts += [f"- target {run['target']} bpw, {run['train_tokens']:,} training tokens each, {run['side_by_side']} "
                  f"runs at once on {m.get('card')} (torch {m.get('torch')}, transformers {m.get('transformers')}, "
                  f"commit {m.get('commit')}, {m.get('date')}); original: held-out ppl "
                  f"{fmt(o['heldout_ppl'], '{:.2f}')}, second domain {fmt(o['docs_ppl'], '{:.2f}')}; "
                  f"winner: **{run['winner']}**", "",
                  "| variant | --set | stored bpw | held-out ppl | second-domain ppl | held-out rise | "
                  "second-domain rise | score | corpus s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            parts.append(f"| {r['variant']} | {' '.join(r['sets']) or '(defaults then)'} | "
                         f"{fmt(r['stored_bpw'], '{:.3f}')} | {fmt(r['heldout_ppl'], '{:.2f}')} | "
                         f"{fmt(r['docs_ppl'], '{:.2f}')} | {fmt(r['heldout_rise'], '{:.4f}')} | "
                         f"{fmt(r['docs_rise'], '{:.4f}')} | {fmt(r['score'], '{:.4f}')} | "
                         f"{fmt(r['corpus_seconds'], '{:.0f}')} |")
        parts.append("")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("--valid", required=True)
    s.add_argument("--head", required=True)
    s.add_argument("--tail", required=True)
    s.add_argument("--share", type=float, default=0.9)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--calib", required=True)
    r.add_argument("--heldout", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--target", default="3.0")
    r.add_argument("--train-tokens", type=int, default=6_000_000)
    r.add_argument("--variant", action="append", required=True, help="NAME=key=value,key=value (NAME= for defaults)")
    r.add_argument("--work", required=True)
    r.add_argument("--commit", help="the commit run, where the tree is not a git checkout")
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    args = parser.parse_args()
    {"split": split, "run": run, "report": lambda a: report(a.files)}[args.command](args)


if __name__ == "__main__":
    main()
