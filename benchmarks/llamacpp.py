"""llama.cpp on our GGUF export: the same perplexity on the same token windows, and CPU decode speed.

Run (main venv):  python benchmarks/llamacpp.py [--windows 16] [--threads 2] [--new-tokens 64]
Needs llama-cpp-python in its own venv (built from source for this CPU):
    python3 -m venv benchmarks/.venv-llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" benchmarks/.venv-llamacpp/bin/pip install llama-cpp-python
On a CPU with AMX (Sapphire Rapids) that native build segfaulted in its first decode of this Q4_1 file
(0.3.36); built with every x86 feature but AMX it runs:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" .../pip install llama-cpp-python
Writes benchmarks/results/llamacpp.json; `python benchmarks/report.py` renders RESULTS.md.

Steps: smollm2-135m -> RTN w4 g32 with a float16 zero (`hypercompress compress smollm2-135m --method
rtn --set bits=4 --set group_size=32 --set zero_point=float`, the grid GGUF's Q4_1 holds exactly) ->
artifact -> `hypercompress.exporters.export(artifact, "gguf", ...)`. WikiText-2 test is tokenized once by
the artifact's tokenizer; the first W non-overlapping 512-token windows go, as token ids in a JSON
file, to this same script run by the llama.cpp venv's python (`llama-side`), so both sides score
identical ids (no BOS, no context between windows, 511 predictions per window). Ours:
hypercompress.evaluate (eval.evaluate_windows) on the artifact from hypercompress.load, float32.
llama.cpp: Llama(logits_all=True, n_ctx=512, n_batch=512), one eval per window, NLL from its logits.
Decode: batch 1, greedy, a fixed prompt (not test text); tokens/s over N one-token steps after the
prompt (prompt processing excluded): llama.cpp eval() per token; ours HF generate, timed as
generate(N+1 new tokens) - generate(1 new token), median of 3 after a warm-up, with the kernels
hypercompress.load picks (recorded), float32 and bfloat16; the load average is recorded around each.
Diagnostic: the same artifact exported with every weight F32 (gguf_type='F32', force_type=True)
and scored by llama.cpp the same way.
Tokenizer check: llama.cpp's tokenization of fixed strings and of the validation text's first 20k
characters against ours (the test text is used for perplexity only).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LLAMA_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
PROMPT = "The history of the old city begins with a small settlement on the river, where"
TOKENIZER_CHECK = ["Hello world! The year 1998 saw 3,456 visitors.", "  indented\ttext, with   spaces\n\nand lines",
                   "naïve café — 東京 <|endoftext|> end"]
RECIPE = [{"method": "rtn", "bits": 4, "group_size": 32, "zero_point": "float"}]
CLI = ("hypercompress compress smollm2-135m --method rtn --set bits=4 --set group_size=32 "
       "--set zero_point=float --out ART && hypercompress export ART --format gguf --out GGUF")


def llama_side(job_file: str, out_file: str) -> None:
    """Run by the llama.cpp venv's python: perplexity, top-1 agreement with ours, tokenization and
    greedy decode speed of the GGUF, as JSON. Imports only llama_cpp and numpy."""
    import numpy as np
    import llama_cpp

    job = json.loads(Path(job_file).read_text())
    threads, n_ctx = job["threads"], job["seq_len"]
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    nll, agree, predicted, tick = [], 0, 0, time.perf_counter()
    for window, ours_top1 in zip(job["windows"], job["ours_top1"]):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        targets = np.asarray(window[1:])
        nll.append(float((log_z - logits[np.arange(len(targets)), targets]).mean()))
        agree += int((logits.argmax(-1) == np.asarray(ours_top1)).sum())
        predicted += len(targets)
    ppl_seconds = time.perf_counter() - tick
    tokens = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in job["texts"]]
    del llm
    result = {"nll_per_window": nll, "ppl": math.exp(sum(nll) / len(nll)), "top1_vs_ours": agree / predicted,
              "ppl_seconds": ppl_seconds, "tokens": tokens, "version": llama_cpp.__version__,
              "system_info": llama_cpp.llama_print_system_info().decode().strip()}
    if not job["new_tokens"]:
        Path(out_file).write_text(json.dumps(result))
        return
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    runs, generated, own, load = [], [], [], [os.getloadavg()]
    for run in range(4):  # the first is a warm-up
        llm.reset()
        llm.eval(job["prompt"])
        llama_cpp.llama_perf_context_reset(llm.ctx)
        out, tick = [], time.perf_counter()
        for _ in range(job["new_tokens"]):
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            out.append(int(row.argmax()))
            llm.eval([out[-1]])
        seconds = time.perf_counter() - tick
        perf = llama_cpp.llama_perf_context(llm.ctx)
        if run:
            runs.append(job["new_tokens"] / seconds)
            own.append(1000.0 * perf.n_eval / perf.t_eval_ms)
        generated = out
    load.append(os.getloadavg())
    Path(out_file).write_text(json.dumps({
        **result, "decode_tokens_per_second": statistics.median(runs), "decode_runs": runs,
        "decode_tokens_per_second_llama_perf": statistics.median(own), "generated": generated,
        "load_average": load}))


def hf_decode(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Median decode tokens/s of HF generate (greedy, batch 1): (N+1 new tokens) - (1 new token)."""
    import torch

    ids = torch.tensor([prompt])
    kwargs = {"do_sample": False, "use_cache": True, "pad_token_id": 0}

    def timed(count: int):
        tick = time.perf_counter()
        out = model.generate(ids, max_new_tokens=count, min_new_tokens=count, **kwargs)
        return time.perf_counter() - tick, out[0, len(prompt):].tolist()

    timed(8)  # warm-up
    rates, text = [], []
    for _ in range(3):
        first, _ = timed(1)
        total, text = timed(new_tokens + 1)
        rates.append(new_tokens / (total - first))
    return statistics.median(rates), text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", help="keep the artifact and GGUF here (default: a temporary directory)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from common import eval_windows, machine, write_json

    import transformers
    import hypercompress
    from hypercompress.eval import evaluate_windows, protocol_text
    from hypercompress.exporters import export
    from hypercompress.sources.models import load_model
    from hypercompress.modules import count_params
    from hypercompress.recipe import Recipe

    if not LLAMA_PYTHON.is_file():
        sys.exit(f"{LLAMA_PYTHON} not found; build llama-cpp-python there first (see this file's docstring)")
    work_dir = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or work_dir.name)
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    params = count_params(loaded.model)
    recipe = Recipe.from_list(RECIPE)
    tick = time.perf_counter()
    hypercompress.compress(loaded.model, recipe)
    artifact = hypercompress.save(loaded.model, loaded.tokenizer, work / "artifact", recipe=recipe.to_list(),
                                  original_params=params, extra={"source_model": "smollm2-135m"})
    compress_seconds = time.perf_counter() - tick
    del loaded
    tick = time.perf_counter()
    report = export(artifact, "gguf", work / "gguf")
    export_seconds = time.perf_counter() - tick
    gguf_file = work / "gguf" / report["file"]
    print(report["summary"], flush=True)

    model, tokenizer = hypercompress.load(artifact)
    chunks, available = eval_windows(tokenizer, args.seq_len, args.windows)
    ours = evaluate_windows(model, chunks, batch_size=4)
    per_window, top1 = [], []
    with torch.inference_mode():
        for window in chunks:
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
            per_window.append(torch.nn.functional.cross_entropy(logits, window[1:]).item())
            top1.append(logits.argmax(-1).tolist())
    print(f"ours: ppl {ours['ppl']:.4f}", flush=True)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    valid = Path(ROOT.parent.parent / "shared" / "data" / "wikitext2_valid_tokenized.txt")
    texts = TOKENIZER_CHECK + ([valid.read_text()[:20000]] if valid.is_file() else [])
    job = {"gguf": str(gguf_file), "threads": args.threads, "seq_len": args.seq_len,
           "windows": chunks.tolist(), "ours_top1": top1, "prompt": prompt,
           "new_tokens": args.new_tokens, "texts": texts}
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run([str(LLAMA_PYTHON), __file__, "llama-side", str(work / "job.json"), str(work / "llama.json")],
                   check=True)
    theirs = json.loads((work / "llama.json").read_text())
    # diagnostic: the same artifact with every weight in F32 (exact, and no 8-bit activations in
    # llama.cpp's matmuls), perplexity only
    export(artifact, "gguf", work / "gguf-f32", gguf_type="F32", force_type=True)
    (work / "job-f32.json").write_text(json.dumps({**job, "gguf": str(work / "gguf-f32" / "model.gguf"),
                                                   "new_tokens": 0}))
    subprocess.run([str(LLAMA_PYTHON), __file__, "llama-side", str(work / "job-f32.json"),
                    str(work / "llama-f32.json")], check=True)
    f32 = json.loads((work / "llama-f32.json").read_text())
    ours_tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    print(f"llama.cpp: ppl {theirs['ppl']:.4f}, decode {theirs['decode_tokens_per_second']:.1f} tok/s", flush=True)

    speed, continuation, backends, load = {}, {}, {}, {"llama_cpp_run": theirs["load_average"]}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model, _ = hypercompress.load(artifact, dtype=dtype)  # the fast kernels load picks (kernels/)
        backends[name] = dict(Counter(model.hypercompress_backends.values()))
        before = os.getloadavg()
        speed[name], continuation[name] = hf_decode(model, prompt, args.new_tokens)
        load[f"ours_{name}"] = [before, os.getloadavg()]
        print(f"ours {name}: decode {speed[name]:.2f} tok/s ({backends[name]})", flush=True)
    same = next((i for i, (a, b) in enumerate(zip(continuation["float32"], theirs["generated"])) if a != b),
                args.new_tokens)
    gap = theirs["ppl"] / ours["ppl"] - 1
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    gguf_bpw = gguf_file.stat().st_size * 8 / params
    art_bpw = (artifact / "model.safetensors").stat().st_size * 8 / params
    script = (f"python benchmarks/llamacpp.py --windows {args.windows} --threads {args.threads} "
              f"--new-tokens {args.new_tokens}")
    decode = (f"greedy decode, batch 1, {args.threads} threads, {len(prompt)}-token prompt, "
              f"{args.new_tokens} new tokens, prompt excluded, median of 3 after a warm-up")
    rows = [
        {"label": "hypercompress artifact, PyTorch float32", "ppl": ours["ppl"], "bits_per_weight": art_bpw,
         "cpu_tokens_per_second": round(speed["float32"], 2), "command": script,
         "notes": f"hypercompress.load + evaluate_windows; HF generate ({decode})"},
        {"label": "hypercompress artifact, PyTorch bfloat16", "ppl": None, "bits_per_weight": art_bpw,
         "cpu_tokens_per_second": round(speed["bfloat16"], 2), "command": script,
         "notes": "speed only: hypercompress.load(dtype=bfloat16), HF generate"},
        {"label": "llama.cpp on the GGUF export", "ppl": theirs["ppl"], "bits_per_weight": gguf_bpw,
         "cpu_tokens_per_second": round(theirs["decode_tokens_per_second"], 2), "command": CLI,
         "notes": (f"llama-cpp-python {theirs['version']}; bpw = model.gguf bytes x 8 / params; ppl "
                   f"{100 * gap:+.2f}% vs ours; top-1 agreement with ours {theirs['top1_vs_ours']:.4f}")},
        {"label": "llama.cpp on an F32 GGUF of the same artifact (diagnostic)", "ppl": f32["ppl"],
         "bits_per_weight": (work / "gguf-f32" / "model.gguf").stat().st_size * 8 / params,
         "command": "python -c \"from hypercompress.exporters import export; export('ART', 'gguf', 'GGUF', "
                    "gguf_type='F32', force_type=True)\"",
         "notes": (f"ppl {100 * (f32['ppl'] / ours['ppl'] - 1):+.3f}% vs ours, top-1 agreement "
                   f"{f32['top1_vs_ours']:.4f}: the Q4_1 file's gap is llama.cpp's Q4_1 x Q8_1 dot "
                   "product (8-bit activations), not the weights")},
    ]
    write_json("llamacpp", {
        "title": "llama.cpp vs hypercompress on the same artifact (SmolLM2-135M, RTN w4 g32 float zero = Q4_1)",
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized)", "params": params,
        "protocol": protocol_text("WikiText-2 raw test", args.seq_len, chunks.shape[0], available,
                                  torch.float32, None) + "; llama.cpp scores the same token ids; " + decode,
        "machine": machine() + f"; llama.cpp: {theirs['system_info']}",
        "script": script,
        "commit": commit + ("+uncommitted changes" if dirty else ""),
        "versions": {"hypercompress": hypercompress.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                     "llama-cpp-python": theirs["version"]},
        "recipe": RECIPE, "compress_seconds": round(compress_seconds, 2), "export_seconds": round(export_seconds, 2),
        "export": {k: report[k] for k in ("summary", "exact", "requantized", "bytes", "file_type")},
        "ppl": {"ours": ours["ppl"], "llama_cpp": theirs["ppl"], "relative_gap": gap,
                "ours_per_window": per_window, "llama_cpp_per_window": theirs["nll_per_window"],
                "top1_agreement": theirs["top1_vs_ours"], "llama_cpp_f32_weights": f32["ppl"],
                "llama_cpp_f32_weights_per_window": f32["nll_per_window"]},
        "decode_tokens_per_second": {"llama_cpp": theirs["decode_tokens_per_second"],
                                     "llama_cpp_runs": theirs["decode_runs"],
                                     "llama_cpp_own_timer": theirs["decode_tokens_per_second_llama_perf"],
                                     "ours_float32": speed["float32"], "ours_bfloat16": speed["bfloat16"]},
        "ours_backends": backends, "load_average_1_5_15min_before_after": load,
        "greedy_tokens_equal_to_ours_float32": same,
        "tokenizer": {"texts": len(texts), "same_ids": [a == b for a, b in zip(ours_tokens, theirs["tokens"])]},
        "rows": rows,
    })
    if work_dir is not None:
        work_dir.cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["llama-side"]:
        llama_side(sys.argv[2], sys.argv[3])
    else:
        main()
