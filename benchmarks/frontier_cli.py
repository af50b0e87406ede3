"""The SmolLM2-135M frontier made with the CLI a user types, defaults only (issue 27).

    python benchmarks/frontier_cli.py run --model M.gguf --calib valid.txt --test test.txt --device cuda \
        --targets 4.0 3.0 2.5 2.0 --work DIR       # one pipeline per target, run side by side
    python benchmarks/frontier_cli.py report DIR/frontier_cli.json   # -> markdown rows

Per target T, exactly these commands (subprocesses, the installed CLI):
    hypercompress compress M --target-bpw T --distill --calib valid.txt --device cuda --seed 0 --out A --json C.json
    hypercompress evaluate A --data test.txt --max-windows 64 --teacher M --device cuda --no-keep --json E64.json
    hypercompress evaluate A --data test.txt --teacher M --device cuda --no-keep --json E.json
    hypercompress evaluate A --data docs.txt --teacher M --device cuda --no-keep --json D.json
and the original once on test.txt (64 and all windows) and docs.txt. docs.txt is the second domain:
Python standard-library docstrings (eval/domains.py). `domain_gap` = (relative NLL rise on docs) /
(relative NLL rise on all WikiText-2 test windows): how much more the model loses off its calibration
domain. Wall minutes per step come from each compress's own time table; tokens seen and tok/s from
its qat stage report. Pipelines that share one GPU each train at a share of its speed: the run says
how many ran together.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hypercompress", *args]


def _pipeline(target: str, args, work: Path) -> list[list[str]]:
    out, common = work / f"bpw{target}", ["--teacher", args.model, "--device", args.device, "--no-keep"]
    return [
        _cli("compress", args.model, "--target-bpw", target, "--distill", "--calib", args.calib, "--device",
             args.device, "--seed", "0", "--out", str(out), "--json", str(work / f"compress-{target}.json")),
        _cli("evaluate", str(out), "--data", args.test, "--max-windows", "64", *common, "--json",
             str(work / f"eval64-{target}.json")),
        _cli("evaluate", str(out), "--data", args.test, *common, "--json", str(work / f"eval-{target}.json")),
        _cli("evaluate", str(out), "--data", str(work / "docs.txt"), *common, "--json",
             str(work / f"docs-{target}.json")),
    ]


def run(args) -> None:
    from hypercompress.eval.domains import describe, stdlib_docs_text

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = stdlib_docs_text()
    (work / "docs.txt").write_text(docs)
    base = ["--device", args.device, "--no-keep"]
    originals = [_cli("evaluate", args.model, "--data", args.test, "--max-windows", "64", *base, "--json",
                      str(work / "orig-eval64.json")),
                 _cli("evaluate", args.model, "--data", args.test, *base, "--json", str(work / "orig-eval.json")),
                 _cli("evaluate", args.model, "--data", str(work / "docs.txt"), *base, "--json",
                      str(work / "orig-docs.json"))]
    chains = {t: _pipeline(t, args, work) for t in args.targets}
    chains["original"] = originals
    procs, logs, started = {}, {}, time.time()
    step = {name: 0 for name in chains}
    while True:
        for name, chain in chains.items():
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None:
                logs[name].write(f"\n[exit {proc.returncode} after {time.time() - started:.0f} s]\n")
                if proc.returncode != 0:
                    step[name] = len(chain)  # a failed step ends its pipeline
            if step[name] < len(chain):
                logs.setdefault(name, open(work / f"log-{name}.txt", "a"))
                logs[name].write("$ " + " ".join(chain[step[name]]) + "\n")
                logs[name].flush()
                procs[name] = subprocess.Popen(chain[step[name]], stdout=logs[name], stderr=subprocess.STDOUT)
                step[name] += 1
            else:
                procs[name] = None
        if all(p is None for p in procs.values()):
            break
        time.sleep(2)
    result = {"targets": args.targets, "side_by_side": len(args.targets), "docs": describe(docs), "rows": {}}
    for name in ["original", *args.targets]:
        prefix = "orig-" if name == "original" else ""
        suffix = "" if name == "original" else f"-{name}"
        row = {}
        for key, file in (("eval64", f"{prefix}eval64{suffix}.json"), ("eval", f"{prefix}eval{suffix}.json"),
                          ("docs", f"{prefix}docs{suffix}.json"), ("compress", f"compress{suffix}.json")):
            path = work / file
            row[key] = json.loads(path.read_text()) if path.exists() else None
        result["rows"][name] = row
    (work / "frontier_cli.json").write_text(json.dumps(result, indent=1, default=str))


def _nll(evaluation: dict | None) -> float | None:
    return math.log(evaluation["ppl"]) if evaluation and evaluation.get("ppl") else None


def report(path: str) -> None:
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    base_test, base_docs = _nll(rows["original"]["eval"]), _nll(rows["original"]["docs"])
    print("| target | stored bpw | ppl first 64 | ppl all | KL | top-1 | domain gap | wall min (planning, qat) "
          "| tokens seen | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in data["targets"]:
        row = rows[name]
        c = row["compress"]
        if not c:
            print(f"| {name} | failed: see log-{name}.txt | | | | | | | | |")
            continue
        qat = next((s.get("training") for s in c["stages"] if s.get("training")), {}) or {}
        e2e = qat.get("end_to_end") or {}
        timeline = {r["step"]: r["seconds"] for r in c.get("timeline", [])}
        planning = sum(v for k, v in timeline.items() if k.startswith("planning"))
        qat_seconds = sum(v for k, v in timeline.items() if "qat" in k)
        test, docs = _nll(row["eval"]), _nll(row["docs"])
        gap = ((docs - base_docs) / base_docs) / ((test - base_test) / base_test) if None not in (
            test, docs, base_test, base_docs) and test != base_test else float("nan")
        e64 = row["eval64"] or {}
        print(f"| {name} | {c['bits_per_weight']:.3f} | {e64.get('ppl', float('nan')):.2f} | "
              f"{(row['eval'] or {}).get('ppl', float('nan')):.2f} | {e64.get('kl', float('nan')):.3f} | "
              f"{e64.get('top1', float('nan')):.3f} | {gap:.2f}x | {c['wall_seconds'] / 60:.1f} ({planning / 60:.1f}, "
              f"{qat_seconds / 60:.1f}) | {e2e.get('tokens', 0):,} | {e2e.get('tokens_per_second', 0):,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--calib", required=True)
    r.add_argument("--test", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--targets", nargs="+", default=["4.0", "3.0", "2.5", "2.0"])
    r.add_argument("--work", required=True)
    p = sub.add_parser("report")
    p.add_argument("file")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args.file)


if __name__ == "__main__":
    main()
