"""The SmolLM2-135M frontier made with the CLI a user types, defaults only (issue 27).

    python benchmarks/frontier_cli.py run --model M.gguf --calib valid.txt --test test.txt --device cuda \
        --targets 4.0 3.0 2.5 2.0 --work DIR       # one pipeline per target, one at a time
    python benchmarks/frontier_cli.py report DIR/frontier_cli.json [MORE.json]  # -> results/frontier_cli.json

Per target T, exactly these commands (subprocesses, the installed CLI):
    hypercompress compress M --target-bpw T --distill --calib valid.txt --device cuda --seed 0 --out A --json C.json
    hypercompress evaluate A --data test.txt --max-windows 64 --teacher M --device cuda --no-keep --json E64.json
    hypercompress evaluate A --data test.txt --teacher M --device cuda --no-keep --json E.json
    hypercompress evaluate A --data docs.txt --teacher M --device cuda --no-keep --json D.json
and the original once on test.txt (64 and all windows) and docs.txt. docs.txt is the second domain:
Python standard-library docstrings (eval/domains.py). `domain_gap` = (relative NLL rise on docs) /
(relative NLL rise on all WikiText-2 test windows): how much more the model loses off its calibration
domain. Wall minutes per step come from each compress's own time table; tokens seen and tok/s from
its qat stage report. By default one pipeline runs at a time (`--side-by-side 1`: the original's
evaluations, then each target's compress and evaluations), as a user's run would have the card and
the host's cores to itself; pipelines that share one GPU each train at a share of its speed, and
the run records how many ran together, the card and the versions.

`report` merges the runs' files (a target's row from the last file that holds it) into
benchmarks/results/frontier_cli.json, rendered into RESULTS.md by benchmarks/report.py.
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
    from hypercompress.eval.domains import stdlib_docs_text

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
    chains = {"original": originals, **{t: _pipeline(t, args, work) for t in args.targets}}
    procs, logs, started = {}, {}, time.time()
    step = {name: 0 for name in chains}
    while True:
        for name, chain in chains.items():
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                continue
            running = sum(1 for n, p in procs.items() if p is not None and p.poll() is None and n != name)
            if proc is None and running >= args.side_by_side:
                continue  # a pipeline not yet started waits for a free place
            if proc is not None:
                logs[name].write(f"\n[exit {proc.returncode} after {time.time() - started:.0f} s]\n")
                _write_result(args, work, docs)
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
    _write_result(args, work, docs)


def _write_result(args, work: Path, docs: str) -> None:
    """DIR/frontier_cli.json from the files the pipelines wrote so far (a step not run: None), written
    after every finished step, so a run cut short still holds its finished rows."""
    from hypercompress.eval.domains import describe

    result = {"targets": args.targets, "side_by_side": args.side_by_side, "docs": describe(docs),
              "machine": _machine(args.commit), "rows": {}}
    for name in ["original", *args.targets]:
        prefix = "orig-" if name == "original" else ""
        suffix = "" if name == "original" else f"-{name}"
        row = {}
        for key, file in (("eval64", f"{prefix}eval64{suffix}.json"), ("eval", f"{prefix}eval{suffix}.json"),
                          ("docs", f"{prefix}docs{suffix}.json"), ("compress", f"compress{suffix}.json")):
            path = work / file
            row[key] = json.loads(path.read_text()) if path.exists() else None
        result["rows"][name] = row
    partial = work / "frontier_cli.json.part"
    partial.write_text(json.dumps(result, indent=1, default=str))
    partial.replace(work / "frontier_cli.json")


def _machine(commit: str | None = None) -> dict:
    """The card, versions, commit (`commit`, else git's; None outside a git checkout) and date of a run."""
    import platform

    import torch
    import transformers

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"card": card, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": commit or None, "date": time.strftime("%Y-%m-%d")}


def _nll(evaluation: dict | None) -> float | None:
    return math.log(evaluation["ppl"]) if evaluation and evaluation.get("ppl") else None


COMMAND = ("hypercompress compress smollm2-135m --target-bpw {target} --distill --calib "
           "../shared/data/wikitext2_valid_tokenized.txt --device cuda --seed 0 --out OUT")


def row_of(data: dict, name: str) -> dict:
    """One target's measured row from a run file: the numbers the compress and evaluate JSONs hold."""
    rows = data["rows"]
    base_test, base_docs = _nll(rows["original"]["eval"]), _nll(rows["original"]["docs"])
    row, c = rows[name], rows[name]["compress"]
    qat = next((s.get("training") for s in c["stages"] if s.get("training")), {}) or {}
    e2e = qat.get("end_to_end") or {}
    timeline = {r["step"]: r["seconds"] for r in c.get("timeline", [])}
    test, docs = _nll(row["eval"]), _nll(row["docs"])
    gap = ((docs - base_docs) / base_docs) / ((test - base_test) / base_test) if None not in (
        test, docs, base_test, base_docs) and test != base_test else None
    e64 = row["eval64"] or {}
    return {"target": name, "command": COMMAND.format(target=name), "stored_bpw": c["bits_per_weight"],
            "ppl_first_64": e64.get("ppl"), "ppl_all": (row["eval"] or {}).get("ppl"), "kl": e64.get("kl"),
            "top1": e64.get("top1"), "domain_gap": gap, "wall_seconds": c["wall_seconds"],
            "planning_seconds": sum(v for k, v in timeline.items() if k.startswith("planning")),
            "qat_seconds": sum(v for k, v in timeline.items() if "qat" in k),
            "corpus_seconds": qat.get("corpus_seconds"), "tokens_seen": e2e.get("tokens"),
            "tokens_per_second": e2e.get("tokens_per_second"), "stopped_by_time": e2e.get("stopped_by_time"),
            "plan": (c.get("allocation") or {}).get("notes"), "machine": data.get("machine"),
            "side_by_side": data.get("side_by_side"),
            "original": {"ppl_first_64": (rows["original"]["eval64"] or {}).get("ppl"),
                         "ppl_all": (rows["original"]["eval"] or {}).get("ppl")}}


def report(paths: list[str]) -> None:
    """Merge run files into benchmarks/results/frontier_cli.json (a target's row from the last file
    that finished its whole pipeline; rows of targets no file holds are kept) and print its markdown rows."""
    out = Path(__file__).resolve().parent / "results" / "frontier_cli.json"
    merged = {r["target"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name in data["targets"]:
            row = data["rows"].get(name) or {}
            if all(row.get(k) for k in ("compress", "eval64", "eval", "docs")):  # a finished pipeline
                merged[name] = row_of(data, name)
    rows = [merged[t] for t in sorted(merged, key=float, reverse=True)]
    data = {"title": "The SmolLM2-135M frontier through the CLI a user types (issue 27)", "rows": rows}
    out.write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(section(data)))


def section(data: dict) -> list[str]:
    """RESULTS.md rows of benchmarks/results/frontier_cli.json."""
    parts = [f"## {data['title']}", "", "- per target: `" + COMMAND + "`, then `hypercompress evaluate OUT "
             "--teacher smollm2-135m --device cuda` on WikiText-2 test (first 64 and all windows) and on the "
             "second domain (Python standard-library docstrings): `python benchmarks/frontier_cli.py run` / "
             "`report` (on the GPU host the same GGUF file is passed by its path)", "- gap: relative NLL rise on the second domain / on all WikiText-2 test windows", "",
             "| target | stored bpw | ppl first 64 | ppl all | KL | top-1 | gap | wall min | planning min | corpus s "
             "| qat min | tokens seen | tok/s | card, pipelines at once | commit, date |", "|" + "---|" * 15]
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    for r in data["rows"]:
        m = r.get("machine") or {}
        parts.append(
            f"| {r['target']} | {fmt(r['stored_bpw'], '{:.3f}')} | {fmt(r['ppl_first_64'], '{:.2f}')} | "
            f"{fmt(r['ppl_all'], '{:.2f}')} | {fmt(r['kl'], '{:.3f}')} | {fmt(r['top1'], '{:.3f}')} | "
            f"{fmt(r['domain_gap'], '{:.2f}x')} | {r['wall_seconds'] / 60:.1f} | {r['planning_seconds'] / 60:.1f} | "
            f"{fmt(r['corpus_seconds'], '{:.0f}')} | {r['qat_seconds'] / 60:.1f} | {fmt(r['tokens_seen'], '{:,}')} | "
            f"{fmt(r['tokens_per_second'], '{:,.0f}')} | {m.get('card', '?')} (torch {m.get('torch', '?')}), "
            f"{r.get('side_by_side')} | {m.get('commit') or '?'}, {m.get('date') or '?'} |")
    parts += [f"- {r['target']}: {r['note']}" for r in data["rows"] if r.get("note")]
    if data["rows"]:
        o = data["rows"][0]["original"]
        parts += ["", f"- original: ppl first 64 {fmt(o['ppl_first_64'], '{:.2f}')}, all {fmt(o['ppl_all'], '{:.2f}')}"]
    return parts + [""]


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
    r.add_argument("--side-by-side", type=int, default=1, help="pipelines at once on the one card")
    r.add_argument("--commit", help="the commit run, where the tree is not a git checkout (a GPU host's copy)")
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args.files)


if __name__ == "__main__":
    main()
