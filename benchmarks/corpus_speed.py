"""Throughput of teacher_corpus (the teacher writing its own training corpus).

    PYTHONPATH=src python benchmarks/corpus_speed.py [--model smollm2-135m] [--windows 16] [--batch 16 ...]
        [--decoder static dynamic] [--length 512] [--device cpu] [--random-shape] [--out RUN.json]
    python benchmarks/corpus_speed.py report RUN.json ...   # -> results/corpus_speed.json (RESULTS.md)

Prompts: 64 windows of `length` tokens of the WikiText-2 validation text; each corpus run writes into a
fresh temporary cache folder (nothing reused). Prints the fingerprint time and, per batch size, the
seconds of the whole call, as JSON. `--random-shape`: a model of SmolLM2-135M's configuration with
random weights and random prompt ids (decode speed does not depend on the weights; no model file
needs to travel to a GPU host). Every (`--decoder`, `--batch`) pair is measured one after another:
static = training/decode.py's StaticDecoder (compiled with CUDA graphs on CUDA; its compile time is in
the call's seconds), dynamic = its reference loop `decode`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from hypercompress.sources.data import tokenize, windows
from hypercompress.sources.models import load_model
from hypercompress.training import corpus

VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid_tokenized.txt"


def report(paths: list[str]) -> None:
    """Merge run files (each: one invocation's JSON with its command, machine and rows) into
    benchmarks/results/corpus_speed.json, in the order given."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = {k: v for k, v in data.items() if isinstance(v, dict) and "stats" in v}
        runs.append({"command": data.get("command"), "model": data["model"], "machine": data.get("machine"),
                     "note": data.get("note"), "rows": rows})
    out = Path(__file__).resolve().parent / "results" / "corpus_speed.json"
    out.write_text(json.dumps({"title": "How fast the original writes its training corpus (training/decode.py)",
                               "runs": runs}, indent=1))
    print("\n".join(section(json.loads(out.read_text()))))


def section(data: dict) -> list[str]:
    """The RESULTS.md section of results/corpus_speed.json."""
    parts = [f"## {data['title']}", "",
             "- tok/s after warm-up: generated tokens / (seconds - the first two compiled steps' seconds, i.e. "
             "compilation and CUDA-graph capture); whole-call tok/s includes them", ""]
    for run in data["runs"]:
        m = run["machine"] or {}
        parts += [f"- `{run['command']}` ({run['model']}; {m.get('card')}, torch {m.get('torch')}, transformers "
                  f"{m.get('transformers')}, commit {m.get('commit')}, {m.get('date')})"
                  + (f"; note: {run['note']}" if run.get("note") else ""), "",
                  "| decoder, batch | windows | generated tokens | warm-up s | tok/s after warm-up | whole-call tok/s "
                  "| peak GPU GiB |", "|---|---|---|---|---|---|---|"]
        for label, row in run["rows"].items():
            st, peak = row["stats"], row.get("peak_gpu_bytes")
            parts.append(f"| {label} | {row['windows']:,} | {st['generated_tokens']:,} | {st.get('warmup_seconds', 0):.1f} "
                         f"| {row['tokens_per_second_after_warmup']:,.0f} | {st['tokens_per_second']:,.0f} | "
                         f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} |")
        parts.append("")
    return parts


def main() -> None:
    if sys.argv[1:2] == ["report"]:
        report(sys.argv[2:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--random-shape", action="store_true")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--text", default=str(VALID))
    parser.add_argument("--decoder", nargs="+", choices=["static", "dynamic"], default=["static"])
    parser.add_argument("--out", help="also write the result JSON here")
    args = parser.parse_args()
    if args.random_shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
        teacher = LlamaForCausalLM(config).eval().to(args.device)
        prompts = torch.randint(0, config.vocab_size, (64, args.length))
        args.model = "random weights, SmolLM2-135M's configuration"
    else:
        loaded = load_model(args.model, device=args.device)
        teacher = loaded.model
        prompts = windows(tokenize(loaded.tokenizer, Path(args.text).read_text()[:2_000_000]), args.length, 64)
    start = time.perf_counter()
    corpus.model_fingerprint(teacher)
    result = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
              "fingerprint_s": round(time.perf_counter() - start, 3),
              "parameters": sum(p.numel() for p in teacher.parameters())}
    runs = [(decoder, batch) for decoder in args.decoder for batch in args.batch]
    for decoder, batch in runs:
        with tempfile.TemporaryDirectory() as tmp:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = corpus.teacher_corpus(teacher, prompts, tokens=args.windows * args.length, length=args.length,
                                        batch=batch, cache_dir=tmp, device=args.device,
                                        static_cache=decoder == "static")
            seconds = time.perf_counter() - start
            with safe_open(str(next(Path(tmp).glob("*.safetensors"))), framework="pt") as handle:
                meta = json.loads(handle.metadata()[corpus.META])
        key = f"{decoder} batch {batch}"
        stats = meta["stats"]
        steady = stats["generated_tokens"] / max(stats["seconds"] - stats.get("warmup_seconds", 0.0), 1e-9)
        result[key] = {"seconds": round(seconds, 2), "windows": out.shape[0], "stats": stats,
                       "tokens_per_second_after_warmup": round(steady, 1),
                       "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None}
        print(json.dumps({key: result[key]}), flush=True)
    result["command"] = "python benchmarks/corpus_speed.py " + " ".join(sys.argv[1:])
    result["machine"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                         "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
