"""Recovery training sharded (FSDP2, training/sharding.py) against replicated: the same compress
command run as one process and under torchrun, rows of wall time per phase, end-to-end tokens/s,
peak GPU memory per process, perplexity, and how far each artifact is from the one-process one.

    # a host of N GPUs: one process, then N processes replicated (ddp) and sharded (fsdp)
    python benchmarks/sharded_training.py run --calib FILE --eval TEXT --device cuda --processes 2,4
    # one GPU: also the sharded code path on a one-process group (nothing to shard: what the path
    # costs, and that it runs on CUDA with compiled blocks and bf16)
    python benchmarks/sharded_training.py run --calib FILE --eval TEXT --device cuda --processes 1

    # the end-to-end step alone: a SmolLM2-shaped random model's qat step, replicated and sharded
    # in a one-process group (no model file needed; seconds, not minutes)
    python benchmarks/sharded_training.py step --device cuda

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
STEP_RESULTS = Path(__file__).resolve().parent / "results" / "sharded_training_step.json"


def step_rows(device: str, steps: int, batch: int, length: int) -> list[dict]:
    """qat's end-to-end step (every linear fake-quantized at 3 bits, group 64, norms trained, the
    engine's defaults) on a SmolLM2-135M-shaped random Llama: replicated, then sharded in a
    one-process group; tokens/s after the first (compiling) step, peak GPU memory of the loop (CUDA's
    peak is reset before each row)."""
    import copy

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from hypercompress.methods.qat.method import Qat, QatConfig
    from hypercompress.training.distill import DistillSettings, distill, train_norms
    from hypercompress.training.engine import Engine

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29519")
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    windows = torch.randint(0, config.vocab_size, (4 * batch, length))
    rows = []
    for sharding in ("ddp", "fsdp"):
        if sharding == "fsdp":
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)
        student, teacher = copy.deepcopy(base), copy.deepcopy(base)
        fakes = Qat(QatConfig(bits=3, group_size=64))._fake_quantize(
            student, [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n])
        params = {f"{n}.{k}": p for n, f in fakes.items() for k, p in f.named_parameters()}
        train_norms(student, params)
        student.to(device), teacher.to(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        history = distill(student, teacher, windows, params, None,
                          DistillSettings(steps, batch, 1.5e-4, 0.1, 0.0, 0, engine=Engine(sharding=sharding)),
                          device=device)
        timed = history[1:]
        rows.append({"row": "one process" if sharding == "ddp" else "one-process group, fsdp",
                     "sharding": "fsdp" if history[-1]["sharded"] else "none", "steps": len(history),
                     "first_step_seconds": round(history[0]["seconds"], 2),
                     "step_seconds": round(sum(h["seconds"] for h in timed) / len(timed), 4),
                     "tokens_per_second": round(batch * length * len(timed) / sum(h["seconds"] for h in timed), 1),
                     "peak_gpu_gib": round(history[-1].get("peak_gpu_bytes", 0) / 2 ** 30, 2) or None})
        print(json.dumps(rows[-1]), flush=True)
    dist.destroy_process_group()
    return rows


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
    parser.add_argument("command", choices=["run", "step"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-name", help="how the results name the model (default: --model); e.g. "
                                             "smollm2-135m for the built-in's GGUF carried to a GPU host")
    parser.add_argument("--calib", help="calibration text (never the evaluation text); run")
    parser.add_argument("--eval", help="evaluation text (perplexity of each artifact); run")
    parser.add_argument("--steps", type=int, default=8, help="step: training steps of each row")
    parser.add_argument("--batch", type=int, default=32, help="step: windows per step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--processes", default="1", help="comma-separated process counts above 1 to run "
                                                          "under torchrun (1: one GPU's rows only)")
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe (its qat stage is the one measured)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--train-tokens", type=int, default=3_000_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.command == "step":
        import transformers

        rows = step_rows(args.device, args.steps, args.batch, 512)
        gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
        command = f"python benchmarks/sharded_training.py step --device {args.device} --steps {args.steps} --batch {args.batch}"
        STEP_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        out = args.out if args.out != RESULTS else STEP_RESULTS
        out.write_text(json.dumps({"machine": f"{gpu}{machine()}, transformers {transformers.__version__}",
                                   "command": command, "rows": rows}, indent=2) + "\n")
        return
    if not (args.calib and args.eval):
        parser.error("run needs --calib and --eval")
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
