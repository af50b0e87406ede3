"""Training throughput of the recovery engine (issue 27): qat's end-to-end phase on SmolLM2-135M and
on a 7B-shaped model, per engine setting, through the same `qat` stage a user's recipe runs.

    python benchmarks/train_speed.py --model smollm2-135m --device cuda --steps 30 --out results/train_speed.json
    python benchmarks/train_speed.py --shape llama2-7b --layers 4 --device cuda --steps 10 --out R.json
    python benchmarks/train_speed.py --shape smollm2-135m --device cuda --out R.json   # random weights, no GGUF
    python benchmarks/train_speed.py --plan mixed --only "bf16 batch 32 compiled" --device cuda --out R.json

For each setting (precision, compile, batch, micro-batch) a fresh copy of the model gets the stage
[{"method": "qat", "bits": 3, "group_size": 64, "block_steps": 0, "steps": S, ...}] on random-offset
windows of 512 tokens of the calibration text (or random tokens for the shaped model), and the loop's
stage report gives tokens/s (over the steps after the first, which compiles) and tokens seen; peak GPU memory is read after the run and divided by the trained
parameters (billions). `--plan mixed` trains a mixed plan instead of 3-bit g64 everywhere: RTN first
stores the embedding at w4 g64 and the block linears at the options and counts of the planner's SmolLM2
plan at 4.0 bpw (w4 rows x73, w4 g64 x113, w8 rows x24, spread over the blocks by a seeded shuffle),
and qat trains those codes (one recipe, so its teacher is the original); blocks then differ in layout, and each row records the graphs dynamo
compiled and whether it ran past its recompile limit (RESULTS' "before" rows ran this script on an
earlier commit's src). A 7B shape is measured with `--layers` of its 32 blocks (the whole model's
float32 latents and AdamW moments alone would be 84 GB): memory per billion parameters carries over.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypercompress.apply import apply_recipe  # noqa: E402
from hypercompress.recipe import Recipe  # noqa: E402

SETTINGS = {  # label -> qat keys
    "fp32 batch 8 (the old loop's setting)": {"precision": "fp32", "compile": False, "batch": 8},
    "bf16 batch 8": {"precision": "bf16", "compile": False, "batch": 8},
    "bf16 batch 32": {"precision": "bf16", "compile": False, "batch": 32},
    "bf16 batch 32 compiled": {"precision": "bf16", "compile": True, "batch": 32},
    "bf16 batch 64 (micro 32) compiled": {"precision": "bf16", "compile": True, "batch": 64, "micro_batch": 32},
}
SHAPES = {  # random weights of the published shapes (layers: --layers, default all)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, num_hidden_layers=32, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, num_hidden_layers=30, tie_word_embeddings=True)}


def load(args):
    if args.shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
        config = LlamaConfig(**shape, max_position_embeddings=4096)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).eval()
        return model, torch.randint(0, config.vocab_size, (256, 512), generator=torch.Generator().manual_seed(0))
    from hypercompress.sources.data import calibration_samples, read_text, tokenize
    from hypercompress.sources.models import load_model

    loaded = load_model(args.model)
    ids = tokenize(loaded.tokenizer, read_text(args.calib))
    return loaded.model, calibration_samples(ids, 256, 512, 0)


MIXED_PLAN = {(4, -1): 73, (4, 64): 113, (8, -1): 24}  # the planner's SmolLM2 plan at 4.0 bpw (block linears)


def mixed_stages(model) -> list[dict]:
    """RTN stages storing the embedding at w4 g64 and the block linears at MIXED_PLAN's options and
    counts (scaled to the model's linears), spread over the blocks by a shuffle seeded 0."""
    import random
    import re

    from hypercompress.arch import arch_of

    blocks = arch_of(model.config.model_type).blocks
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)]
    total = sum(MIXED_PLAN.values())
    options = [o for o, count in MIXED_PLAN.items() for _ in range(round(count * len(linears) / total))]
    options = (options + [options[-1]] * len(linears))[:len(linears)]
    random.Random(0).shuffle(options)
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    stages = [{"method": "rtn", "bits": 4, "group_size": 64, "targets": [f"^{re.escape(embedding)}$"]}]
    for option in MIXED_PLAN:
        names = [n for n, o in zip(linears, options) if o == option]
        stages.append({"method": "rtn", "bits": option[0], "group_size": option[1],
                       "targets": [f"^{re.escape(n)}$" for n in names]})
    return stages


def measure(model, windows, keys: dict, args) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hypercompress.methods.qat.method import Qat  # noqa: F401  (registered)

    student = copy.deepcopy(model)
    stage = {"method": "qat", "bits": 3, "group_size": 64, "block_steps": 0, "steps": args.steps,
             "teacher_fraction": 0, **keys}
    stages = [stage]
    if args.plan == "mixed":  # one recipe, as compress runs a plan: the teacher is the original, not the RTN copy
        stage = {k: v for k, v in stage.items() if k not in ("bits", "group_size")}  # trains the stored codes
        stages = [*mixed_stages(student), stage]
    torch._dynamo.reset()
    counters.clear()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    report = apply_recipe(student, Recipe.from_list(stages, where="train_speed"), windows, device=args.device)
    wall = time.perf_counter() - tick
    trained = report["stages"][-1]["training"]["end_to_end"]
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
    past_limit = any("recompile" in key.lower() and "limit" in key.lower() for key in counters["unimplemented"])
    return {"settings": stage, "plan": args.plan, **trained, "stage_seconds": round(wall, 2), "peak_gpu_bytes": peak,
            "gib_per_billion_params": peak / 2**30 / (params / 1e9),
            "graphs": counters["stats"].get("unique_graphs", 0), "past_recompile_limit": past_limit,
            "recompile_limit": torch._dynamo.config.recompile_limit}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=0, help="blocks of --shape (0: all)")
    parser.add_argument("--calib", default="../shared/data/wikitext2_valid_tokenized.txt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="labels of SETTINGS to run (default: all)")
    parser.add_argument("--plan", choices=("uniform", "mixed"), default="uniform")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, windows = load(args)
    rows = {}
    for label, keys in SETTINGS.items():
        if args.only and label not in args.only:
            continue
        try:
            rows[label] = measure(model, windows, keys, args)
        except Exception as exc:  # a setting that fails (out of memory, a compiler error) is a row too
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(label, json.dumps(rows[label]), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.shape or args.model, "plan": args.plan, "layers": args.layers if args.shape
                                          else None, "device": device, "torch": torch.__version__, "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
