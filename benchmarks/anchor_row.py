"""One row of benchmarks/anchors.py, in its own process: compress SmolLM2 with one library, time it,
measure peak memory, size and quality. Run by anchors.py with the right interpreter:

    python benchmarks/anchor_row.py --library ours|llmcompressor --row gptq-w4g64 --work DIR

DIR holds calib.safetensors (the shared calibration windows), windows.safetensors (the evaluation
windows), eval.safetensors (the teacher's log-probabilities per batch of 4 windows) and receives
ROW.LIBRARY.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor_rows import ROWS  # noqa: E402

from hypercompress.eval import evaluate_windows  # noqa: E402
from hypercompress.sources.models import load_model  # noqa: E402
from hypercompress.modules import count_params  # noqa: E402

BATCH = 4


class CachedTeacher(Sequence):
    """The teacher's log-probs per evaluation batch, read lazily from eval.safetensors."""

    def __init__(self, path: Path, windows: int):
        self.handle, self.windows = safe_open(str(path), framework="pt"), windows

    def __len__(self) -> int:
        return (self.windows + BATCH - 1) // BATCH

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.handle.get_tensor(f"log_probs.{index}")


def safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


PLAN_INFO: dict = {}  # filled by a planner row: its route, what it kept and the GPTQ trials' KLs


def run_ours(model, tokenizer, spec, calib, work):
    from hypercompress.storage import artifact
    from hypercompress.apply import apply_recipe
    from hypercompress.recipe import Recipe

    params = count_params(model)
    tick = time.perf_counter()
    lossless = None
    if isinstance(spec["ours"], dict):  # a size target: planned as `compress --target-bpw` plans (timed too)
        from hypercompress.planning.target import planned_recipe
        from hypercompress.planning.target import PlanTarget

        lossless = 10  # what size targets store
        recipe, allocation = planned_recipe(model, PlanTarget(spec["ours"]["target_bpw"]), calib, 0, lossless)
        PLAN_INFO.update({"plan_route": allocation["route"], "plan_notes": allocation["notes"],
                          "plan_trial_kl": allocation.get("trial_kl")})
    else:
        recipe = Recipe.from_list(spec["ours"])
    apply_recipe(model, recipe, calib, batch_size=8)
    seconds = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        path = artifact.save(model, tokenizer, Path(tmp) / "a", recipe=recipe.to_list(),
                             original_params=params, lossless=lossless)
        size = (path / artifact.WEIGHTS).stat().st_size
        model, _ = artifact.load(path)  # evaluate what was saved
    return model, seconds, peak, size, json.dumps(recipe.to_list())


def run_llmcompressor(model, tokenizer, spec, calib, work):
    from datasets import Dataset
    from llmcompressor import oneshot

    config_dir = work / "llmcompressor-config"  # oneshot re-reads the config from name_or_path
    model.config.save_pretrained(config_dir)
    tokenizer.save_pretrained(config_dir)
    model.config._name_or_path = str(config_dir)
    modifier = spec["llmcompressor"]()
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    tick = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, tokenizer=tokenizer)
    seconds = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        # saved as their users would: 16-bit dense tensors (our artifacts store those as float16)
        model.to(torch.bfloat16).save_pretrained(tmp, save_compressed=True)
        model.to(torch.float32)
        size = safetensors_bytes(Path(tmp))
    return model, seconds, peak, size, repr(modifier)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", choices=["ours", "llmcompressor"], required=True)
    parser.add_argument("--row", choices=sorted(ROWS), required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    params = count_params(loaded.model)
    calib = load_file(str(args.work / "calib.safetensors"))["input_ids"]
    run = run_ours if args.library == "ours" else run_llmcompressor
    model, seconds, peak, size, recipe = run(loaded.model, loaded.tokenizer, ROWS[args.row], calib,
                                             args.work)
    windows = load_file(str(args.work / "windows.safetensors"))["windows"]
    teacher = CachedTeacher(args.work / "eval.safetensors", windows.shape[0])
    result = evaluate_windows(model.eval(), windows, BATCH, teacher)
    result.update({"row": args.row, "library": args.library, "compress_seconds": round(seconds, 2),
                   "peak_memory_bytes": peak, "safetensors_bytes": size,
                   "bits_per_weight": size * 8 / params, "recipe": recipe, **PLAN_INFO})
    (args.work / f"{args.row}.{args.library}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("row", "library", "ppl", "bits_per_weight",
                                             "compress_seconds")}), flush=True)


if __name__ == "__main__":
    main()
