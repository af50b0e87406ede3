"""results/speed.json and its RESULTS.md section from speed.py run files (python benchmarks/speed.py merge ...)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

PROTOCOL = ("layers: Llama-2-7B MLP shapes (in x out), random codes stored as hypercompress stores "
            "them, the fast path `hypercompress.load` takes (prepare_fast) or the one a kind names (-tinygemm, -triton); x of the listed token counts; "
            "GPU: CUDA events around a CUDA graph of 20 calls, median of 5; CPU: wall time, median of "
            "5; vs dense = time / dense GEMM time at the same dtype and tokens; bound = weight-operand "
            "bytes / measured copy bandwidth (read + write of a large copy); models: HF generate, "
            "greedy, 16 prompt + 128 new tokens, tokens/s = batch x 128 / wall time, cuDNN SDPA off on CUDA "
            "(it rebuilds its plan at every KV length: ~13 ms of host time per attention call, profiled); SmolLM2 perplexity: "
            "WikiText-2 test tokenized once, first 16 non-overlapping windows of 512 tokens, in the row's dtype")


def merge(files: list[str], name: str = "speed",
          title: str = "Speed: fast paths against dense and the bandwidth bound") -> None:
    """results/NAME.json (a section of RESULTS.md titled `title`) from speed.py run files."""
    rows, machines, commands = [], [], []
    for file in files:
        data = json.loads(Path(file).read_text())
        rows += data["rows"]
        machine = data["machine"] if "torch " in data["machine"] else f"{data['machine']} (torch {data['torch']})"
        if machine not in machines:
            machines.append(machine)
        command = re.sub(r"--(gguf|scratch|out) \S+", r"--\1 PATH", data["command"])
        commands.append(re.sub(r"--test-text \S+", "--test-text ../shared/data/wikitext2_test.txt", command))
    write_json(name, {"title": title,
                         "model": "layers of Llama-2-7B's shapes; a 7B-shaped model; SmolLM2-135M",
                         "params": 0, "protocol": PROTOCOL, "machine": " | ".join(machines),
                         "script": " && ".join(commands), "rows": rows, "kind": "speed"})
    from report import render

    render()


def speed_section(data: dict, name: str = "speed") -> list[str]:
    """The Markdown of results/NAME.json (a speed.py merge): tables of layers and of models."""
    rows = data["rows"]
    out = [f"- protocol: {data['protocol']}", f"- machine: {data['machine']}",
           f"- command: `{data['script']}` -> `benchmarks/results/{name}.json`", ""]
    layer = [r for r in rows if r["section"] == "layer"]
    if layer:
        out += ["| device | shape | tokens | kind | backend | us | vs dense | bound us | vs bound | kernel MB | stored MB |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in layer:
            vs_dense = "n/a" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}x"
            out.append(f"| {r['device']} {r['dtype']} | {r['shape']} | {r['tokens']} | {r['kind']} | {r['backend']} "
                       f"| {r['us']:.1f} | {vs_dense} | {r['bound_us']:.1f} | {r['vs_bound']:.2f}x "
                       f"| {r['kernel_bytes'] / 1e6:.1f} | {r['stored_bytes'] / 1e6:.1f} |")
        out.append("")
    models = [r for r in rows if r["section"] in ("model", "smollm2", "smollm2-ppl")]
    if models:
        out += ["| device | model | kind | path | batch | tokens/s | peak GiB | ppl (16 x 512) | backend |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in models:
            peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
            name = r.get("model") or ("SmolLM2-135M, real weights (perplexity rows; cuDNN SDPA on)"
                                      if r["section"] == "smollm2-ppl" else "SmolLM2-135M, real weights"
                                      if r.get("ppl16") is not None else "SmolLM2-135M-shaped, random weights")
            out.append(f"| {r['device']} | {name} | {r['kind']} | {r.get('path', 'fast')} | {r['batch']} "
                       f"| {'n/a' if r['tokens_per_s'] is None else format(r['tokens_per_s'], '.1f')} | {peak} | {r.get('ppl16') or 'n/a'} | {r['backend']} |")
        out.append("")
    return out
