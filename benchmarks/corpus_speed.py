"""Throughput of teacher_corpus (the teacher writing its own training corpus).

    PYTHONPATH=src python benchmarks/corpus_speed.py [--model smollm2-135m] [--windows 16] [--batch 16]
        [--length 512] [--device cpu]

Prompts: 64 windows of `length` tokens of the WikiText-2 validation text; each corpus run writes into a
fresh temporary cache folder (nothing reused). Prints the fingerprint time and, per cache kind, the
generated (sampled) tokens per second over the whole call, as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from hypercompress.data import tokenize, windows
from hypercompress.models import load_model
from hypercompress.training import corpus

VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid_tokenized.txt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--text", default=str(VALID))
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device)
    teacher = loaded.model
    prompts = windows(tokenize(loaded.tokenizer, Path(args.text).read_text()[:2_000_000]), args.length, 64)
    start = time.perf_counter()
    corpus.model_fingerprint(teacher)
    result = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
              "fingerprint_s": round(time.perf_counter() - start, 3),
              "parameters": sum(p.numel() for p in teacher.parameters())}
    for kind in ("decode",):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = corpus.teacher_corpus(teacher, prompts, tokens=args.windows * args.length, length=args.length,
                                        batch=args.batch, cache_dir=tmp)
            seconds = time.perf_counter() - start
            with safe_open(str(next(Path(tmp).glob("*.safetensors"))), framework="pt") as handle:
                meta = json.loads(handle.metadata()[corpus.META])
        stats = meta["stats"]
        result[kind] = {"seconds": round(seconds, 2), "windows": out.shape[0], "stats": stats}
        print(json.dumps({kind: result[kind]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
