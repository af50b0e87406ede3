"""The hybrid pipeline at whole-model size ratios on SmolLM2: with and without distillation recovery.

    python benchmarks/hybrid.py run --ratios 8,16,32,100,1000 --out DIR [--device cpu] [--distill-steps 0]
    python benchmarks/hybrid.py merge FILE...         # -> results/hybrid.json + RESULTS.md

Each row is what `hypercompress compress smollm2-135m --target-ratio R [--distill]` does: the recipe
planned for the target (the budget planner above the quantization floor, the pipeline of
src/hypercompress/planning/hybrid.py below it), compression, the lossless stage (zstd 10), the artifact
saved, reloaded and evaluated (whole WikiText-2 test, seq_len 512, KL and top-1 vs the original).
With --distill-steps N a ratio gives two rows from one compression: the artifact as stored just
before the distillation stage (no recovery) and after it. Also: weights the model computes with,
CPU tokens/s (float32 forward, batch 1, 512 tokens, CPU_THREADS threads, on the run's machine) and
wall time (from the start of planning; a recovery row's includes its no-recovery row). The anchor of a ratio is the lowest-perplexity single-method row of
the other results/*.json whose bpw is at most the target's (+2%), with its table named.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypercompress import artifact  # noqa: E402
from hypercompress.apply import _passes, apply_recipe  # noqa: E402
from hypercompress.storage.artifact import round_to_storage  # noqa: E402
from hypercompress.planning.target import planned_recipe  # noqa: E402
from hypercompress.errors import UserError  # noqa: E402
from hypercompress.eval import evaluate_windows, protocol_text  # noqa: E402
from hypercompress.modules import effective_weights  # noqa: E402
from hypercompress.recipe import Recipe  # noqa: E402
from hypercompress.planning.target import PlanTarget

CPU_THREADS = 2  # CPU tokens/s measured with this many threads (the CI machine's cores)


def measure(ratio: float, teacher, tokenizer, calib, test, args, params: int) -> list[dict]:
    """One compression for the ratio; with --distill-steps, two rows from it: the artifact as it
    stands before the distillation stage (no recovery) and after it (recovery)."""
    student = copy.deepcopy(teacher).cpu()
    tick = time.perf_counter()
    recipe, allocation = planned_recipe(student, PlanTarget(16 / ratio), calib, args.distill_steps, 10, args.device)
    stages = recipe.to_list()
    label = f"{ratio:g}x {allocation['route']}"
    info = {"ratio_target": ratio, "route": allocation["route"], "notes": "; ".join(allocation.get("notes", []))}
    rows = []
    before_distill = len(_passes(Recipe.from_list(stages[:-1]))) if args.distill_steps else -1
    passes = 0

    def after_stage(model) -> dict:
        nonlocal passes
        passes += 1
        if passes == before_distill:  # the same model, stored as it would be without the recovery
            snapshot = copy.deepcopy(model)
            round_to_storage(snapshot)
            notes = [n for n in allocation.get("notes", []) if not n.startswith("distillation")]
            before = {**info, "notes": "; ".join(notes)}
            rows.append(artifact_row(snapshot, label, stages[:-1], tick, teacher, tokenizer, test, args, params, before))
        return {}

    apply_recipe(student, recipe, calib, device=args.device, after_stage=after_stage)
    rows.append(artifact_row(student, label + (f" + distill {args.distill_steps}" if args.distill_steps else ""),
                             stages, tick, teacher, tokenizer, test, args, params, info))
    return rows


def artifact_row(student, label: str, stages: list, tick: float, teacher, tokenizer, test, args, params: int,
                 info: dict) -> dict:
    """Save `student` (lossless stage zstd 10), reload it and evaluate the reloaded model."""
    compress_seconds = time.perf_counter() - tick
    weights = effective_weights(student)
    with tempfile.TemporaryDirectory() as tmp:
        path = artifact.save(student, tokenizer, Path(tmp) / "a", recipe=stages, original_params=params,
                             lossless=10)
        size = (path / artifact.WEIGHTS).stat().st_size
        del student
        loaded, _ = artifact.load(path, dtype=args.dtype)
    reference = copy.deepcopy(teacher).to(args.device, args.dtype)  # the original, in the same dtype
    result = evaluate_windows(loaded.to(args.device), test, 8, reference)
    del reference
    row = {"label": label, **info, "bits_per_weight": size * 8 / params, "ratio_vs_16bit": 16 * params / (size * 8),
           "safetensors_bytes": size, "weights": weights, "compress_seconds": round(compress_seconds, 1),
           "cpu_tokens_per_second": cpu_tokens_per_second(loaded, test),
           "wall_seconds": round(time.perf_counter() - tick, 1), "recipe": json.dumps(stages),
           **{k: result[k] for k in ("ppl", "kl", "top1")}}
    print(json.dumps({k: row[k] for k in ("label", "bits_per_weight", "ppl", "kl", "wall_seconds")}), flush=True)
    return row


@torch.no_grad()
def cpu_tokens_per_second(model, test, threads: int = CPU_THREADS, windows: int = 2) -> int:
    """Forward throughput on the CPU with `threads` threads (float32, batch 1, 512-token windows):
    comparable across machines of one CPU kind, whichever device evaluated."""
    model = model.to("cpu", torch.float32).eval()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model(input_ids=test[:1])  # warm-up
        tick = time.perf_counter()
        for i in range(windows):
            model(input_ids=test[i: i + 1])
        return round(windows * test.shape[1] / (time.perf_counter() - tick))
    finally:
        torch.set_num_threads(saved)


def run(args) -> None:
    from common import gpu_run_setup

    teacher, tokenizer, params, calib, ids, test = gpu_run_setup(args)
    protocol = protocol_text("WikiText-2 raw test", 512, test.shape[0], ids.numel() // 512, args.dtype,
                             "the uncompressed model", args.device)
    out = Path(args.out) / f"hybrid-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    original = evaluate_windows(copy.deepcopy(teacher).to(args.device, args.dtype), test, 8)
    rows = [{"label": "original (16-bit)", "ratio_target": 1.0, "bits_per_weight": 16.0, "ratio_vs_16bit": 1.0,
             "weights": params, "ppl": original["ppl"], "kl": 0.0, "top1": 1.0,
             "cpu_tokens_per_second": cpu_tokens_per_second(copy.deepcopy(teacher), test),
             "wall_seconds": round(time.perf_counter() - started, 1)}]
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        try:
            rows += measure(ratio, teacher, tokenizer, calib, test, args, params)
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
    for ratio in sorted({r["ratio_target"] for r in rows if r["ratio_target"] > 1}):
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
        rows = list({r["label"]: r for r in rows}.values())  # a label measured twice: the later file's row
        labels = {r["label"] for r in rows}
        measured = [r for r in old if r["label"] not in labels and "anchor" not in r["label"]] + rows
        return sorted(measured + anchors(measured), key=lambda r: (r["ratio_target"], "anchor" in r["label"]))

    merge_runs("hybrid", "Hybrid pipeline at whole-model size ratios (SmolLM2-135M)", files, arrange)


def main() -> None:
    from common import run_merge_parser

    parser, r = run_merge_parser(__doc__.splitlines()[0], "cpu", 32)  # 32: the CLI's default
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    r.add_argument("--ratios", default="8,16,32,100,1000")
    r.add_argument("--distill-steps", type=int, default=0, help="0: no recovery; else steps of 8 x 512 tokens")
    args = parser.parse_args()
    if args.command == "run":
        args.dtype = getattr(torch, args.dtype)
        run(args)
    else:
        merge(args.files)

if __name__ == "__main__":
    main()
