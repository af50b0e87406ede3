"""Recovery training sharded (FSDP2, training/sharding.py) against replicated: the same compress
command run as one process and under torchrun, rows of wall time per phase, end-to-end tokens/s,
peak GPU memory per process, perplexity, and how far each artifact is from the one-process one.

    # a host of N GPUs: one process, then N processes replicated (ddp) and sharded (fsdp)
    python benchmarks/sharded_training.py run --calib FILE --eval TEXT --device cuda --processes 2,4
    # one GPU: also the sharded code path on a one-process group (nothing to shard: what the path
    # costs, and that it runs on CUDA with compiled blocks and bf16)
    python benchmarks/sharded_training.py run --calib FILE --eval TEXT --device cuda --processes 1

The command: recipes/gptq-w3g64-qat-1min.yaml with a fixed token budget (--train-tokens, the time
budget off) so every row trains the same steps. Writes benchmarks/results/sharded_training.json
(python benchmarks/report.py renders it). `one-process-group ARGS` runs `hypercompress ARGS` inside
a one-process torch.distributed group (the path a launcher's processes take, with one of them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "sharded_training.json"
RECIPE = ROOT / "recipes" / "gptq-w3g64-qat-1min.yaml"


def one_process_group(arguments: list[str]) -> None:
    """`hypercompress ARGUMENTS` in a one-process group (NCCL on CUDA, else gloo)."""
    import torch.distributed as dist

    from hypercompress.cli import app

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    try:
        app(arguments, prog_name="hypercompress", standalone_mode=True)
    finally:
        dist.destroy_process_group()


def compress(arguments: list[str], processes: int, group: bool, out: Path) -> tuple[float, dict]:
    """Wall seconds of the whole command and its --json summary."""
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "hypercompress"]
    elif group:
        launcher = [sys.executable, __file__, "one-process-group"]
    else:
        launcher = [sys.executable, "-m", "hypercompress"]
    tick = time.perf_counter()
    done = subprocess.run([*launcher, *arguments, "--out", str(out), "--json", str(out) + ".json"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - tick
    if done.returncode:
        raise SystemExit(f"compress ({processes} process(es)) failed: {done.stderr[-3000:]}")
    return seconds, json.loads(Path(str(out) + ".json").read_text())


def artifact_gap(a: Path, b: Path) -> dict[str, float]:
    """Share of differing codes and the largest scale difference between two artifacts."""
    x, y = (load_file(str(p / "model.safetensors")) for p in (a, b))
    codes = [k for k in x if x[k].dtype in (torch.uint8, torch.int8, torch.int32)]
    return {"codes_differing": sum(int((x[k] != y[k]).sum()) for k in codes) / max(sum(x[k].numel() for k in codes), 1),
            "max_float_difference": max((float((x[k].float() - y[k].float()).abs().max()) for k in x if k not in codes),
                                        default=0.0)}


def row(label: str, processes: int, sharding: str, seconds: float, summary: dict) -> dict:
    stage = next(s for s in summary["stages"] if s["method"] == "qat")
    training, run = stage["training"], stage["training"]["end_to_end"]
    final = summary["branches"][-1]
    return {"row": label, "processes": processes, "sharding": run.get("sharding", sharding),
            "wall_seconds": round(seconds, 1), "qat_stage_seconds": stage["seconds"],
            "corpus_seconds": training["corpus_seconds"], "block_ap_seconds": training["block_ap_seconds"],
            "end_to_end_seconds": run["seconds"], "steps": run["steps"], "tokens": run["tokens"],
            "tokens_per_second": run["tokens_per_second"],
            "peak_gpu_gib": round(run["peak_gpu_bytes"] / 2 ** 30, 2) if "peak_gpu_bytes" in run else None,
            "perplexity": final.get("ppl"), "bits_per_weight": summary["bits_per_weight"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one-process-group":
        return one_process_group(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-name", help="how the results name the model (default: --model); e.g. "
                                             "smollm2-135m for the built-in's GGUF carried to a GPU host")
    parser.add_argument("--calib", required=True, help="calibration text (never the evaluation text)")
    parser.add_argument("--eval", required=True, help="evaluation text (perplexity of each artifact)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--processes", default="1", help="comma-separated process counts above 1 to run "
                                                          "under torchrun (1: one GPU's rows only)")
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe (its qat stage is the one measured)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--train-tokens", type=int, default=3_000_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    arguments = ["compress", args.model, "--recipe", args.recipe, "--calib", args.calib, "--device", args.device,
                 "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len),
                 "--eval", args.eval, "--train-tokens", str(args.train_tokens), "--set", "qat.max_minutes=0"]
    scratch = Path(tempfile.mkdtemp(prefix="hc-sharded-"))
    rows = []
    seconds, summary = compress(arguments, 1, False, scratch / "one")
    rows.append({**row("one process", 1, "none", seconds, summary), **artifact_gap(scratch / "one", scratch / "one")})
    plans = [(1, "fsdp", True)] + [(int(n), mode, False) for n in args.processes.split(",") if int(n) > 1
                                   for mode in ("ddp", "fsdp")]
    for processes, mode, group in plans:
        out = scratch / f"{mode}{processes}"
        seconds, summary = compress([*arguments, "--set", f"qat.sharding={mode}"], processes, group, out)
        label = f"{processes} process{'es' if processes > 1 else ''}, {mode}" + (" (one-process group)" if group else "")
        rows.append({**row(label, processes, mode, seconds, summary), **artifact_gap(out, scratch / "one")})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shown = [args.model_name or args.model if a == args.model else
             f"../shared/data/{Path(a).name}" if a in (args.calib, args.eval) else a for a in arguments]
    import transformers

    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    args.out.write_text(json.dumps({"machine": f"{gpu}{machine()}, transformers {transformers.__version__}", "command": " ".join(shown), "rows": rows}, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
