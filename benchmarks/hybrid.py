"""The hybrid pipeline at whole-model size ratios on SmolLM2: with and without distillation recovery.

    python benchmarks/hybrid.py run --ratios 8,16,32,100,1000 --out DIR [--device cpu] [--distill-steps 0]
    python benchmarks/hybrid.py merge FILE...         # -> results/hybrid.json + RESULTS.md

Each row is what `hypercompress compress smollm2-135m --target-ratio R [--distill]` does: the recipe
planned for the target (the budget planner above the quantization floor, the pipeline of
src/hypercompress/pipeline.py below it), compression, the lossless stage (zstd 10), the artifact
saved, reloaded and evaluated (whole WikiText-2 test, seq_len 512, KL and top-1 vs the original).
Also: weights the model computes with, CPU tokens/s (the evaluation's forward throughput when it
runs on the CPU) and wall time. The anchor of a ratio is the lowest-perplexity single-method row of
the other results/*.json whose bpw is at most the target's (+2%), with its table named.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypercompress import artifact  # noqa: E402
from hypercompress.api import compress  # noqa: E402
from hypercompress.cli.compress import planned_recipe  # noqa: E402
from hypercompress.errors import UserError  # noqa: E402
from hypercompress.eval import evaluate_windows, protocol_text  # noqa: E402
from hypercompress.modules import effective_weights  # noqa: E402
from hypercompress.recipe import PlanTarget  # noqa: E402


def measure(ratio: float, teacher, tokenizer, calib, test, args, params: int) -> dict:
    student = copy.deepcopy(teacher).cpu()
    tick = time.perf_counter()
    recipe, allocation = planned_recipe(student, PlanTarget(16 / ratio), calib, args.distill_steps, 10)
    compress(student, recipe, calib, device=args.device)
    compress_seconds = time.perf_counter() - tick
    weights = effective_weights(student)
    with tempfile.TemporaryDirectory() as tmp:
        path = artifact.save(student, tokenizer, Path(tmp) / "a", recipe=recipe.to_list(),
                             original_params=params, lossless=10)
        size = (path / artifact.WEIGHTS).stat().st_size
        del student
        loaded, _ = artifact.load(path, dtype=args.dtype)
    reference = copy.deepcopy(teacher).to(args.device, args.dtype)  # the original, in the same dtype
    result = evaluate_windows(loaded.to(args.device), test, 8, reference)
    del reference
    label = f"{ratio:g}x pipeline" + (f" + distill {args.distill_steps}" if args.distill_steps else "")
    row = {"label": label, "ratio_target": ratio, "bits_per_weight": size * 8 / params,
           "ratio_vs_16bit": 16 * params / (size * 8), "safetensors_bytes": size, "weights": weights,
           "compress_seconds": round(compress_seconds, 1), "wall_seconds": round(time.perf_counter() - tick, 1),
           "cpu_tokens_per_second": round(result["tokens_per_s"]) if args.device == "cpu" else None,
           "route": allocation["route"], "notes": "; ".join(allocation.get("notes", [])),
           "recipe": json.dumps(recipe.to_list()), **{k: result[k] for k in ("ppl", "kl", "top1")}}
    print(json.dumps({k: row[k] for k in ("label", "bits_per_weight", "ppl", "kl", "wall_seconds")}), flush=True)
    return row


def run(args) -> None:
    from common import gpu_run_setup

    teacher, tokenizer, params, calib, ids, test = gpu_run_setup(args)
    protocol = protocol_text("WikiText-2 raw test", 512, test.shape[0], ids.numel() // 512, args.dtype,
                             "the uncompressed model", args.device)
    out = Path(args.out) / f"hybrid-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        try:
            rows.append(measure(ratio, teacher, tokenizer, calib, test, args, params))
        except UserError as exc:  # a refused target is a row too (the error says what is reachable)
            rows.append({"label": f"{ratio:g}x pipeline", "ratio_target": ratio, "error": str(exc)})
            print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({"rows": rows, "protocol": protocol, "machine": machine_text(),
                                   "command": " ".join(sys.argv)}, indent=2))


def machine_text() -> str:
    from common import machine

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; {machine()}"


def anchors(rows: list[dict]) -> list[dict]:
    """Per ratio, the best single-method row of the other tables at no more bytes (+2%)."""
    from common import RESULTS

    pool = []
    for file in sorted(RESULTS.glob("*.json")):
        if file.stem == "hybrid":
            continue
        data = json.loads(file.read_text())
        pool += [(r, data["title"]) for r in data["rows"] if isinstance(r.get("ppl"), (int, float))
                 and isinstance(r.get("bits_per_weight"), (int, float)) and "+" not in r.get("label", "+")]
    out = []
    for ratio in sorted({r["ratio_target"] for r in rows}):
        fits = [(r, t) for r, t in pool if r["bits_per_weight"] <= 16 / ratio * 1.02]
        if fits:
            best, title = min(fits, key=lambda p: p[0]["ppl"])
            out.append({"label": f"{ratio:g}x anchor: {best['label']}", "ratio_target": ratio,
                        "bits_per_weight": best["bits_per_weight"], "ppl": best["ppl"], "kl": best.get("kl"),
                        "top1": best.get("top1"), "notes": f"from '{title}' (its own protocol)"})
        else:
            out.append({"label": f"{ratio:g}x anchor", "ratio_target": ratio,
                        "notes": "no single-method row at this size"})
    return out


def merge(files: list[str]) -> None:
    """Rows of the run files into results/hybrid.json (old rows not re-measured are kept), with
    the anchors recomputed."""
    from common import merge_runs

    def arrange(old: list[dict], rows: list[dict]) -> list[dict]:
        labels = {r["label"] for r in rows}
        measured = [r for r in old if r["label"] not in labels and "anchor" not in r["label"]] + rows
        return sorted(measured + anchors(measured), key=lambda r: (r["ratio_target"], "anchor" in r["label"]))

    merge_runs("hybrid", "Hybrid pipeline at whole-model size ratios (SmolLM2-135M)", files, arrange)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    r.add_argument("--ratios", default="8,16,32,100,1000")
    r.add_argument("--distill-steps", type=int, default=0, help="0: no recovery; else steps of 8 x 512 tokens")
    r.add_argument("--calib-samples", type=int, default=32, help="calibration windows (the CLI's default)")
    r.add_argument("--windows", type=int, default=0, help="evaluation windows (0: the whole test)")
    r.add_argument("--calib-text", default="../shared/data/wikitext2_valid_tokenized.txt")
    r.add_argument("--test-text", default="../shared/data/wikitext2_test.txt")
    r.add_argument("--out", required=True)
    r.add_argument("--tag", default="rows")
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        args.dtype = getattr(torch, args.dtype)
        run(args)
    else:
        merge(args.files)


if __name__ == "__main__":
    main()
