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

from hypercompress import artifact
from hypercompress.api import compress
from hypercompress.data import read_text, tokenize, windows
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
    compress(student, recipe)
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
