"""Layer-wise calibration split over processes (layerwise.data_parallel): one process against
`torchrun --nproc-per-node N`, the same command otherwise, the artifacts compared.

    python benchmarks/parallel_calibration.py --calib ../shared/data/wikitext2_valid_tokenized.txt
    python benchmarks/parallel_calibration.py --calib FILE --device cuda --processes 2   # a 2-GPU host

Writes benchmarks/results/parallel_calibration.json (python benchmarks/report.py renders it). On a
CPU the one process uses every core and each of N processes 1/N of them (OMP_NUM_THREADS), so the
rows compare the same hardware split two ways.
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

RESULTS = Path(__file__).resolve().parent / "results" / "parallel_calibration.json"


def compress(arguments: list[str], processes: int, threads: int, out: Path) -> tuple[float, dict]:
    """Wall seconds of the whole command and its --json summary."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tick = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "hypercompress", *arguments, "--out", str(out),
                           "--json", str(out) + ".json"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode:
        raise SystemExit(f"compress with {processes} process(es) failed: {done.stderr[-2000:]}")
    return seconds, json.loads(Path(str(out) + ".json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", required=True, help="calibration text (never the evaluation text)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=32)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    arguments = ["compress", args.model, "--method", "gptq", "--set", "bits=4", "--set", "group_size=64",
                 "--calib", args.calib, "--calib-samples", str(args.calib_samples), "--device", args.device]
    scratch = Path(tempfile.mkdtemp(prefix="hc-parallel-"))
    rows, artifacts = [], {}
    for processes in (1, args.processes):
        threads = max(cores // processes, 1) if args.device == "cpu" else 1
        seconds, summary = compress(arguments, processes, threads, scratch / f"p{processes}")
        stage = summary["stages"][0]
        artifacts[processes] = load_file(str(scratch / f"p{processes}" / "model.safetensors"))
        rows.append({"label": f"gptq w4 g64, {processes} process(es) x {threads} thread(s)",
                     "wall_seconds": round(seconds, 1), "stage_seconds": stage["seconds"],
                     "calibration_processes": stage.get("calibration_processes", 1),
                     "command": (f"OMP_NUM_THREADS={threads} torchrun --standalone --nproc-per-node {processes} "
                                 "-m hypercompress " if processes > 1 else "hypercompress ") + " ".join(arguments)})
    one, many = artifacts[1], artifacts[args.processes]
    codes = [k for k in one if one[k].dtype == torch.uint8]
    differing = sum(int((one[k] != many[k]).sum()) for k in codes) / sum(one[k].numel() for k in codes)
    scale_gap = max(float((one[k].float() - many[k].float()).abs().max()) for k in one if k not in codes)
    rows[-1]["notes"] = (f"speed-up {rows[0]['stage_seconds'] / rows[-1]['stage_seconds']:.2f}x on the GPTQ stage; "
                         f"packed code bytes differing from the one-process artifact: {differing:.2e}; "
                         f"largest difference of any other tensor: {scale_gap:.2e}")
    RESULTS.write_text(json.dumps({
        "title": "Layer-wise calibration split over processes (torchrun)",
        "protocol": (f"{args.model}, GPTQ w4 g64, {args.calib_samples} calibration windows of 512 tokens from the "
                     "validation text, --device " + args.device + "; wall seconds of the whole command (loading, "
                     "writing and the launcher included) and of the GPTQ stage alone"),
        "machine": machine(), "script": "python benchmarks/parallel_calibration.py --calib FILE"
        + ("" if args.device == "cpu" else f" --device {args.device} --processes {args.processes}"),
        "rows": rows}, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
