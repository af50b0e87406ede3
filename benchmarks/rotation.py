"""Rotations before quantization on SmolLM2-135M: RTN and GPTQ at 4 / 3 / 2 bits, with and without `rotate`.

    python benchmarks/rotation.py run --model M.gguf --device cuda --calib-text valid.txt \
        --test-text test.txt --out DIR                     # rows -> DIR/rotation-rows.json
    python benchmarks/rotation.py merge FILE...            # -> results/rotation.json + RESULTS.md

Every row quantizes the block linears only (groups of 64, asymmetric; GPTQ with its defaults,
act-order on, 128 calibration windows of 512 validation tokens); the embedding stays float16. The
rotated rows untie SmolLM2's lm_head (the final norm folds into it, not into the embedding), so they
store a second float16 (V, D) table: about 3.4 bpw more. Their bpw column says so; comparing at equal
bytes needs the head quantized too (next rows of issue 14). Each row is saved, reloaded and evaluated.
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
from hypercompress.apply import apply_recipe  # noqa: E402
from hypercompress.eval import evaluate_windows, protocol_text  # noqa: E402
from hypercompress.recipe import Recipe  # noqa: E402

BITS = (4, 3, 2)
METHODS = ("rtn", "gptq")


def rows_to_run() -> list[tuple[str, list[dict]]]:
    out = []
    for bits in BITS:
        for method in METHODS:
            grid = {"method": method, "bits": bits, "group_size": 64, "symmetric": False}
            out.append((f"{method.upper()} w{bits} g64", [grid]))
            out.append((f"rotate + {method.upper()} w{bits} g64", [{"method": "rotate"}, grid]))
    return out


def measure(label: str, stages: list[dict], teacher, tokenizer, calib, test, args, params: int) -> dict:
    tick = time.perf_counter()
    student = copy.deepcopy(teacher)
    recipe = Recipe.from_list(stages)
    apply_recipe(student, recipe, calib, device=args.device)
    compress_seconds = time.perf_counter() - tick
    with tempfile.TemporaryDirectory() as tmp:
        path = artifact.save(student.cpu(), tokenizer, Path(tmp) / "a", recipe=recipe.to_list(), original_params=params)
        size = (path / artifact.WEIGHTS).stat().st_size
        del student
        loaded, _ = artifact.load(path, fast=False)
    reference = copy.deepcopy(teacher).to(args.device, torch.float32)
    result = evaluate_windows(loaded.to(args.device), test, 8, reference)
    row = {"label": label, "bits_per_weight": size * 8 / params, "safetensors_bytes": size,
           "compress_seconds": round(compress_seconds, 1), "recipe": json.dumps(stages),
           **{k: result[k] for k in ("ppl", "kl", "top1")}}
    print(json.dumps({k: row[k] for k in ("label", "bits_per_weight", "ppl", "kl")}), flush=True)
    return row


def run(args) -> None:
    from common import gpu_run_setup
    from hybrid import machine_text

    teacher, tokenizer, params, calib, ids, test = gpu_run_setup(args)
    protocol = protocol_text("WikiText-2 raw test", 512, test.shape[0], ids.numel() // 512, torch.float32,
                             "the uncompressed model", args.device)
    out = Path(args.out) / f"rotation-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    original = evaluate_windows(copy.deepcopy(teacher).to(args.device), test, 8)
    rows = [{"label": "original (16-bit)", "bits_per_weight": 16.0, "ppl": original["ppl"], "kl": 0.0, "top1": 1.0}]
    for label, stages in rows_to_run():
        rows.append(measure(label, stages, teacher, tokenizer, calib, test, args, params))
        out.write_text(json.dumps({"rows": rows, "protocol": protocol, "machine": machine_text(),
                                   "command": " ".join(sys.argv)}, indent=2))


def main() -> None:
    from common import merge_runs, run_merge_parser

    parser, _ = run_merge_parser(__doc__.splitlines()[0], "cuda", 128)
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        merge_runs("rotation", "Rotation (rotate) before RTN and GPTQ on SmolLM2-135M", args.files,
                   lambda old, new: new)


if __name__ == "__main__":
    main()
