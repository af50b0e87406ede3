"""Shared benchmark plumbing: the fixed protocol, machine description, artifact round trip."""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.sources.data import read_text, tokenize, windows
from hypercompress.eval import evaluate_windows
from hypercompress.recipe import Recipe

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DATA = ROOT.parent.parent / "shared" / "data"
TEST_TEXT = DATA / "wikitext2_test.txt"
CALIB_TEXT = DATA / "wikitext2_valid_tokenized.txt"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def eval_windows(tokenizer, seq_len: int, max_windows: int) -> tuple[torch.Tensor, int]:
    ids = tokenize(tokenizer, read_text(str(TEST_TEXT)))
    return windows(ids, seq_len, max_windows), ids.numel() // seq_len


def run_recipe(teacher, tokenizer, recipe: Recipe, original_params: int, chunks, teacher_lp,
               batch_size: int) -> dict:
    """Compress a copy of the teacher, save it, reload the artifact and evaluate the reloaded model."""
    student = copy.deepcopy(teacher)
    tick = time.perf_counter()
    apply_recipe(student, recipe)
    seconds = time.perf_counter() - tick
    with tempfile.TemporaryDirectory() as tmp:
        path = artifact.save(student, tokenizer, Path(tmp) / "artifact", recipe=recipe.to_list(),
                             original_params=original_params)
        del student
        weights_bytes = (path / artifact.WEIGHTS).stat().st_size
        reloaded, _ = artifact.load(path)
    result = evaluate_windows(reloaded, chunks, batch_size, teacher_lp)
    result.update({"bits_per_weight": weights_bytes * 8 / original_params,
                   "safetensors_bytes": weights_bytes, "compress_seconds": round(seconds, 2)})
    return result


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def merge_runs(name: str, title: str, files: list[str], arrange) -> None:
    """Rows of run files (written on the GPU machine or elsewhere) into results/NAME.json, then
    RESULTS.md. `arrange(old_rows, new_rows)` returns the table's rows (which old ones to keep,
    the order); machines and commands accumulate, the commands with machine paths replaced."""
    import re

    from report import render

    old_path = RESULTS / f"{name}.json"
    old = json.loads(old_path.read_text()) if old_path.exists() else {"rows": []}
    rows, protocol, machines, commands = [], old.get("protocol"), set(), []
    if old.get("machine"):
        machines.update(old["machine"].split(" | "))
    for file in files:
        data = json.loads(Path(file).read_text())
        rows += data["rows"]
        protocol = protocol or data["protocol"]
        machines.add(data["machine"])
        command = re.sub(r"--model \S+", "--model SmolLM2-135M-Instruct.Q4_1.gguf", data["command"])
        command = re.sub(r"--out \S+", "--out OUT", command)
        commands.append("python " + command.replace(".data/", "../shared/data/").replace(".carry/", "../shared/data/").replace("--budgets  ", '--budgets "" '))
    write_json(name, {
        "title": title, "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized)",
        "params": 134515008, "protocol": protocol, "machine": " | ".join(sorted(machines)),
        "script": " && ".join(([old["script"].replace(".carry/", "../shared/data/")] if old.get("script") else [])
                              + commands),
        "rows": arrange(old["rows"], rows)})
    render()


def run_merge_parser(description: str, device: str, calib_samples: int):
    """The `run` / `merge` command line of neural.py and hybrid.py: (parser, the run subparser,
    holding what gpu_run_setup reads plus --device, --out and --tag; scripts add their own)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--device", default=device)
    r.add_argument("--calib-samples", type=int, default=calib_samples, help="calibration windows of 512 tokens")
    r.add_argument("--windows", type=int, default=0, help="evaluation windows (0: the whole test)")
    r.add_argument("--calib-text", default=str(CALIB_TEXT))
    r.add_argument("--test-text", default=str(TEST_TEXT))
    r.add_argument("--out", required=True)
    r.add_argument("--tag", default="rows")
    sub.add_parser("merge").add_argument("files", nargs="+")
    return parser, r


def gpu_run_setup(args):
    """What every run of neural.py / hybrid.py starts from: (teacher in eval mode, tokenizer, its
    parameter count, calibration windows (args.calib_samples x 512, seed 0), test token ids, the
    first args.windows 512-token test windows (0: all))."""
    from hypercompress.sources.data import calibration_samples
    from hypercompress.sources.models import load_model
    from hypercompress.modules import count_params

    torch.manual_seed(0)
    loaded = load_model(args.model)
    teacher, tokenizer = loaded.model.eval(), loaded.tokenizer
    calib = calibration_samples(tokenize(tokenizer, read_text(args.calib_text)), args.calib_samples, 512, 0)
    ids = tokenize(tokenizer, read_text(args.test_text))
    return teacher, tokenizer, count_params(teacher), calib, ids, windows(ids, 512, args.windows or None)
