"""Baseline table on SmolLM2-135M: uncompressed, RTN 8/4/3/2 bits, SVD keeping 80/50/30%.

Run:  python benchmarks/baseline.py [--windows 64] [--seq-len 512]
Writes benchmarks/results/baseline.json and regenerates benchmarks/RESULTS.md.
Every row is compressed, saved as an artifact, reloaded from disk and evaluated; bpw is the
artifact's model.safetensors bytes x 8 / the original model's parameters (embeddings included).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import eval_windows, machine, run_recipe, write_json  # noqa: E402
from report import render  # noqa: E402

from hypercompress.eval import protocol_text, teacher_log_probs  # noqa: E402
from hypercompress.sources.models import load_model  # noqa: E402
from hypercompress.modules import count_params  # noqa: E402
from hypercompress.recipe import Recipe  # noqa: E402

ROWS = [
    ("uncompressed (16-bit storage)", [], "hypercompress evaluate smollm2-135m"),
    *[(f"RTN w{b} g64 asym", [{"method": "rtn", "bits": b, "group_size": 64, "symmetric": False}],
       f"--method rtn --set bits={b} --set group_size=64 --set symmetric=false") for b in (8, 4, 3, 2)],
    *[(f"SVD keep {int(k * 100)}%", [{"method": "svd", "keep": k}], f"--method svd --set keep={k}")
      for k in (0.8, 0.5, 0.3)],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    teacher, tokenizer = loaded.model, loaded.tokenizer
    params = count_params(teacher)
    chunks, available = eval_windows(tokenizer, args.seq_len, args.windows)
    tick = time.perf_counter()
    teacher_lp = teacher_log_probs(teacher, chunks, args.batch_size)
    print(f"teacher log-probs in {time.perf_counter() - tick:.0f} s", flush=True)
    rows = []
    for label, stages, command in ROWS:
        recipe = Recipe(stages=[]) if not stages else Recipe.from_list(stages)
        result = run_recipe(teacher, tokenizer, recipe, params, chunks, teacher_lp, args.batch_size)
        if stages:
            command = f"hypercompress compress smollm2-135m {command} --out DIR"
        result.update({"label": label, "recipe": recipe.to_list(), "command": command})
        rows.append(result)
        print(f"{label}: bpw {result['bits_per_weight']:.3f} ppl {result['ppl']:.3f} "
              f"KL {result['kl']:.4f} top1 {result['top1']:.4f}", flush=True)
    write_json("baseline", {
        "title": "Baseline: RTN and plain SVD on SmolLM2-135M",
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized)",
        "params": params,
        "protocol": protocol_text("WikiText-2 raw test", args.seq_len, chunks.shape[0], available,
                                  torch.float32, "the uncompressed model"),
        "machine": machine(),
        "script": "python benchmarks/baseline.py",
        "rows": rows,
    })
    render()


if __name__ == "__main__":
    main()
