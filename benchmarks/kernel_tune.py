"""Tune our Triton kernels' tiles on this GPU and measure where dequantize + GEMM takes over.

    python benchmarks/kernel_tune.py probe                  # each path once: error, time, registers, spills
    python benchmarks/kernel_tune.py run --out runs/tune.json [--bits 2,3,4] [--jobs 16]
    python benchmarks/kernel_tune.py merge runs/tune.json   # -> src/hypercompress/kernels/triton_configs.json
                                                            #    and benchmarks/results/kernel_tune_<GPU>.json

For each width, token bucket (kernels/triton_quant.TOKEN_BUCKETS) and layer size (large: Llama-2-7B's
MLP, 11008 x 4096 and 4096 x 11008, group 128; small: SmolLM2's MLP, 1536 x 576 and 576 x 1536, group
64), every candidate tile config and split-K is timed on random codes with integer zeros (CUDA graph of
20 calls, median of 3 replays), and the one with the least time summed over the size's two shapes is
kept. Then, per width and size, the kernel (its bucket-256 config) is timed against dequantizing W into
the workspace plus torch's dense GEMM at 64..2048 tokens; `gemm_rows` is the largest count up to which
the kernel wins at every measured count. Last, 1, 4 and 16 tokens through our kernel against the path it
replaces (int4 tinygemm for <= 4 bits, the dense weight above): `prefer` says which is the default
(kernels/triton_quant.triton_preferred): ours where its summed time is at most the other's. Compiles run first in --jobs processes sharing Triton's cache,
so the timing process only loads them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"large": ([(11008, 4096), (4096, 11008)], 128), "small": ([(1536, 576), (576, 1536)], 64)}
CROSSOVER_ROWS = (64, 128, 256, 512, 1024, 2048)
WALKS = (False, True)  # INTERLEAVE: codes taken position by position, or interleaved into column order


def candidates(bucket: int, bits: int) -> list[dict]:
    """Tile configs (without SPLIT_K) worth timing for a token bucket and width (buckets 1..16
    share the BLOCK_M = 16 compiles: the token count is not specialized). Codes are walked position
    by position or interleaved back into column order (WALKS)."""
    dot = {"USE_DOT": True, "GROUPSUM": False}
    configs = []
    if bucket == 1:  # CUDA cores: a float32 accumulator per tile, or the tile's group sum
        for (il, gs), bn, warps, stages in itertools.product(
                [(il, gs) for il in WALKS for gs in (False, True) if il or not gs], (16, 32, 64), (4, 8), (2, 4)):
            configs.append({"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": 128, "USE_DOT": False, "INTERLEAVE": il,
                            "GROUPSUM": gs, "num_warps": warps, "num_stages": stages})
        for bn, il, stages in itertools.product((64, 128), WALKS, (2, 3)):
            configs.append({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, **dot, "INTERLEAVE": il,
                            "num_warps": 4, "num_stages": stages})
    elif bucket <= 16:
        for bn, bk, stages, il in itertools.product((64, 128), (64, 128), (2, 3), WALKS):
            configs.append({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, **dot, "INTERLEAVE": il,
                            "num_warps": 4, "num_stages": stages})
    elif bucket == 64:
        for bm, bn, bk, il in itertools.product((32, 64), (64, 128), (64, 128), WALKS):
            configs.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **dot, "INTERLEAVE": il,
                            "num_warps": 4, "num_stages": 3})
    else:
        for bm, bn, warps, il in itertools.product((64, 128), (64, 128), (4, 8), WALKS):
            configs.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, **dot, "INTERLEAVE": il,
                            "num_warps": warps, "num_stages": 3})
    return configs


def splits(bucket: int) -> tuple[int, ...]:
    return {1: (1, 2, 4, 8), 4: (1, 2, 4, 8), 16: (1, 2, 4, 8), 64: (1, 2, 4)}.get(bucket, (1, 2))


def layer(bits: int, out_features: int, in_features: int, group: int, device="cuda"):
    """A QuantLinear of random codes with integer zeros, on the GPU."""
    from hypercompress.layers import QuantLinear

    g = torch.Generator().manual_seed(bits)
    groups = in_features // group
    codes = torch.randint(0, 1 << bits, (out_features, groups, group), generator=g).float()
    scale = torch.rand(out_features, groups, 1, generator=g) * 0.01 + 1e-3
    zero = torch.randint(0, 1 << bits, (out_features, groups, 1), generator=g).float()
    return QuantLinear.from_codes(codes, scale, zero, None, bits, False, "int").to(device)


def call(module, x, config):
    from hypercompress.kernels import triton_quant as tq

    zeros, kind = module.triton_zeros()
    return tq.quant_matmul(x, module.qweight, module.scales, zeros, None, module.bits, kind,
                           module.group_size, module.out_features, config)


def plan(bits_list) -> list[tuple]:
    """Every (bits, size, shape index, bucket, config, split) the timing will run."""
    work = []
    for bits, size, bucket in itertools.product(bits_list, SIZES, (1, 4, 16, 64, 256)):
        for index in range(2):
            for config, split in itertools.product(candidates(bucket, bits), splits(bucket)):
                work.append((bits, size, index, bucket, config, split))
    return work


def compile_work(work: list[tuple]) -> list[tuple]:
    """(bits, config, split) once per compiled kernel: the shapes do not change the compile (their
    sizes are not constexpr), split-K only by whether it is 1."""
    seen, keys = set(), []
    for bits, _, _, bucket, config, split in work:
        key = (bits, json.dumps(config, sort_keys=True), split > 1)
        if key not in seen:
            seen.add(key)
            keys.append((bits, bucket, config, split))
    return keys


def compile_part(part: list[tuple]) -> int:
    """Compile (by running once, on every layer shape) each (bits, bucket, config, split) of `part`
    into Triton's on-disk cache."""
    done = 0
    modules = {}
    for bits, bucket, config, split in part:
        for size, index in itertools.product(SIZES, range(2)):
            shapes, group = SIZES[size]
            out_features, in_features = shapes[index]
            key = (bits, size, index)
            if key not in modules:
                modules[key] = layer(bits, out_features, in_features, group)
            x = torch.randn(bucket, in_features, device="cuda", dtype=torch.bfloat16)
            try:
                call(modules[key], x, {**config, "SPLIT_K": split})
                done += 1
            except Exception as exc:  # a config this GPU cannot run (shared memory, registers): skipped later
                print(f"compile failed: {config} split {split}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    torch.cuda.synchronize()
    return done


def time_us(fn) -> float:
    """Median microseconds of one call (speed.py's timer: CUDA events around a CUDA graph)."""
    from speed import time_call

    return time_call(fn, torch.device("cuda"), repeats=3, calls=20)


def time_all(work: list[tuple], max_seconds: float) -> dict[tuple, float]:
    """{(bits, size, index, bucket, config json, split): us} for every work item that runs, in order,
    until `max_seconds` (0: no limit)."""
    import time

    tick = time.perf_counter()
    timings: dict[tuple, float] = {}
    modules = {}
    for bits, size, index, bucket, config, split in work:
        if max_seconds and time.perf_counter() - tick > max_seconds:
            print(f"--max-seconds reached: {len(timings)} of {len(work)} timed", flush=True)
            break
        shapes, group = SIZES[size]
        out_features, in_features = shapes[index]
        if (bits, size, index) not in modules:
            if any(key[0] != bits for key in modules):
                modules.clear()
            modules[(bits, size, index)] = layer(bits, out_features, in_features, group)
        module = modules[(bits, size, index)]
        x = torch.randn(bucket, in_features, device="cuda", dtype=torch.bfloat16)
        try:
            us = time_us(lambda: call(module, x, {**config, "SPLIT_K": split}))
        except Exception:  # a config this GPU cannot run
            continue
        timings[(bits, size, index, bucket, json.dumps(config, sort_keys=True), split)] = us
    print(f"timed {len(timings)} in {time.perf_counter() - tick:.0f} s", flush=True)
    return timings


def pick_configs(timings: dict, bits_list) -> tuple[dict, list[dict]]:
    """The config with the least time summed over each size's two shapes, per width and bucket."""
    from hypercompress.kernels import triton_quant as tq

    configs, best_rows = {}, []
    for bits, size, bucket in itertools.product(bits_list, SIZES, tq.TOKEN_BUCKETS):
        totals = {}
        for config, split in itertools.product(candidates(bucket, bits), splits(bucket)):
            key = json.dumps(config, sort_keys=True)
            both = [timings.get((bits, size, index, bucket, key, split)) for index in range(2)]
            if None not in both:
                totals[(key, split)] = both
        if not totals:
            continue
        (config, split), both = min(totals.items(), key=lambda item: sum(item[1]))
        configs[f"w{bits}-m{bucket}-{size}"] = {**json.loads(config), "SPLIT_K": split}
        heuristic = tq.heuristic_config(bucket, *SIZES[size][0][0])
        key = json.dumps({k: v for k, v in heuristic.items() if k != "SPLIT_K"}, sort_keys=True)
        best_rows.append({"bits": bits, "size": size, "tokens": bucket, "us": [round(u, 2) for u in both],
                          "config": configs[f"w{bits}-m{bucket}-{size}"],
                          "heuristic_us": [round(timings.get((bits, size, i, bucket, key, heuristic["SPLIT_K"]),
                                                             float("nan")), 2) for i in range(2)]})
        print(json.dumps(best_rows[-1]), flush=True)
    return configs, best_rows


def per_size(bits_list, configs: dict, bucket: int):
    """(bits, size, config of `bucket`, [(module, (out, in)) for the size's shapes]) with a config."""
    for bits, size in itertools.product(bits_list, SIZES):
        config = configs.get(f"w{bits}-m{bucket}-{size}")
        if config is not None:
            shapes, group = SIZES[size]
            yield bits, size, config, [(layer(bits, *shape, group), shape) for shape in shapes]


def crossover(bits_list, configs: dict) -> tuple[dict, list[dict]]:
    """gemm_rows per width and size: the largest token count up to which our kernel (its bucket-256
    config) beats dequantize + dense GEMM at every measured count."""
    from hypercompress.kernels import triton_quant as tq

    gemm_rows, rows_out = {}, []
    for bits, size, config, built in per_size(bits_list, configs, 256):
        wins = []
        for rows in CROSSOVER_ROWS:
            kernel = dense = 0.0
            for module, (out_features, in_features) in built:
                x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
                zeros, kind = module.triton_zeros()
                buffer = torch.empty(out_features * in_features, device="cuda", dtype=torch.bfloat16)

                def dequantize_gemm():
                    weight = tq.dequantize_weight(module.qweight, module.scales, zeros, bits, kind,
                                                  module.group_size, out_features, in_features, buffer)
                    return F.linear(x, weight)

                kernel += time_us(lambda: call(module, x, config))
                dense += time_us(dequantize_gemm)
            wins.append(kernel <= dense)
            rows_out.append({"bits": bits, "size": size, "tokens": rows, "kernel_us": round(kernel, 2),
                             "dequantize_gemm_us": round(dense, 2)})
            print(json.dumps(rows_out[-1]), flush=True)
        first_loss = next((rows for rows, win in zip(CROSSOVER_ROWS, wins) if not win), None)
        won = [rows for rows, win in zip(CROSSOVER_ROWS, wins) if win and (first_loss is None or rows < first_loss)]
        gemm_rows[f"w{bits}-{size}"] = max(won, default=32)
    return gemm_rows, rows_out


ERROR_BOUND = 1.6e-2  # bfloat16 output: the interpreter tests' bound for a rounded y


def check(bits_list, configs: dict) -> dict[str, float]:
    """{config key: the largest |y - x W^T| / max |x W^T| over the size's two shapes}: every picked
    config (and the crossover's dequantize + GEMM) against the float32 reference on the GPU, at its
    bucket's token count and at one token past the previous bucket."""
    from hypercompress.kernels import triton_quant as tq

    errors = {}
    for bits, size in itertools.product(bits_list, SIZES):
        shapes, group = SIZES[size]
        for index, shape in enumerate(shapes):
            module = layer(bits, *shape, group)
            weight = module.dense_weight(torch.float32)
            zeros, kind = module.triton_zeros()
            for previous, bucket in zip((0,) + tq.TOKEN_BUCKETS, tq.TOKEN_BUCKETS):
                key = f"w{bits}-m{bucket}-{size}"
                if key not in configs:
                    continue
                for rows in sorted({bucket, previous + 1}):
                    x = torch.randn(rows, shape[1], device="cuda", dtype=torch.bfloat16)
                    reference = x.float() @ weight.t()
                    y = call(module, x, configs[key]).float()
                    error = float((y - reference).abs().max() / reference.abs().max())
                    errors[key] = max(errors.get(key, 0.0), error)
            buffer = torch.empty(shape[0] * shape[1], device="cuda", dtype=torch.bfloat16)
            dense = tq.dequantize_weight(module.qweight, module.scales, zeros, bits, kind, group, *shape, buffer)
            key = f"w{bits}-dequantize-{size}"
            errors[key] = max(errors.get(key, 0.0), float((dense.float() - weight).abs().max() / weight.abs().max()))
    for key, error in errors.items():
        print(json.dumps({"checked": key, "relative_error": f"{error:.1e}", "ok": error < ERROR_BOUND}), flush=True)
    return errors


def verified(run_: dict, key: str) -> bool:
    """Whether a run checked every config of `key` ("w4-large") and the dequantize path on the GPU
    within ERROR_BOUND (runs before the check existed verified nothing)."""
    from hypercompress.kernels import triton_quant as tq

    bits, size = key.split("-")
    errors = run_.get("errors")
    if not isinstance(errors, dict):
        return False
    needed = [f"{bits}-m{bucket}-{size}" for bucket in tq.TOKEN_BUCKETS] + [f"{bits}-dequantize-{size}"]
    return all(isinstance(errors.get(k), (int, float)) and errors[k] < ERROR_BOUND for k in needed)


PREFER_BUCKETS = (1, 4, 16)  # decode at batch 1, 4 and 16: the calls a server makes most


def preference(bits_list, configs: dict) -> tuple[dict, list[dict]]:
    """The default path of each width and size: ours where its time summed over PREFER_BUCKETS
    (and the size's two shapes) is at most that of the path it replaces (int4 tinygemm for <= 4
    bits, the dense weight above)."""
    from hypercompress.kernels.int4 import Int4Linear

    prefer, rows_out = {}, []
    for bits, size, _, built in per_size(bits_list, configs, 1):
        ours = {bucket: 0.0 for bucket in PREFER_BUCKETS}
        other = dict(ours)
        for module, (out_features, in_features) in built:
            if bits <= 4:
                codes, zero = module.tinygemm_form()
                path = Int4Linear(codes, module.scales, zero, module.group_size, None, torch.bfloat16,
                                  pairs=module.qweight if bits == 4 else None)
            else:
                weight = module.dense_weight(torch.bfloat16)
                path = lambda x, weight=weight: F.linear(x, weight)  # noqa: E731
            for bucket in PREFER_BUCKETS:
                x = torch.randn(bucket, in_features, device="cuda", dtype=torch.bfloat16)
                config = configs[f"w{bits}-m{bucket}-{size}"]
                ours[bucket] += time_us(lambda: call(module, x, config))
                other[bucket] += time_us(lambda: path(x))
        prefer[f"w{bits}-{size}"] = "triton" if sum(ours.values()) <= sum(other.values()) else "other"
        for bucket in PREFER_BUCKETS:
            rows_out.append({"bits": bits, "size": size, "tokens": bucket, "ours_us": round(ours[bucket], 2),
                             "replaced_us": round(other[bucket], 2),
                             "replaced": "int4 tinygemm" if bits <= 4 else "dense"})
            print(json.dumps(rows_out[-1]), flush=True)
    return prefer, rows_out


@torch.inference_mode()
def run(args) -> None:
    import multiprocessing
    import time

    import triton

    from hypercompress.kernels import triton_quant as tq

    bits_list = [int(b) for b in args.bits.split(",")]
    work = plan(bits_list)
    print(f"{len(work)} timings planned; compiling in {args.jobs} processes", flush=True)
    tick = time.perf_counter()
    keys = compile_work(work)
    parts = [keys[i::args.jobs] for i in range(args.jobs)]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = sum(pool.map(compile_part, parts))
    print(f"compiled {len(keys)} kernels ({compiled} runs) in {time.perf_counter() - tick:.0f} s", flush=True)
    configs, best_rows = pick_configs(time_all(work, args.max_seconds), bits_list)
    gemm_rows, crossover_rows = crossover(bits_list, configs)
    prefer, baselines = preference(bits_list, configs)
    result = {"family": tq.gpu_family(torch.device("cuda")), "machine": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__,
              "command": "python benchmarks/kernel_tune.py " + " ".join(sys.argv[1:]),
              "configs": configs, "gemm_rows": gemm_rows, "prefer": prefer, "best": best_rows,
              "crossover": crossover_rows, "baselines": baselines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # the timings are kept whatever follows
    result["errors"] = check(bits_list, configs)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


_FMA = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 128, "USE_DOT": False, "GROUPSUM": False, "num_warps": 4,
        "num_stages": 2, "SPLIT_K": 4}
_DOT = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "USE_DOT": True, "GROUPSUM": False, "num_warps": 4,
        "num_stages": 3, "SPLIT_K": 2}
PROBE_CONFIGS = [  # (tokens, config): one of each path, to read before tuning
    (1, {**_FMA, "INTERLEAVE": False}), (1, {**_FMA, "INTERLEAVE": True}),
    (1, {**_FMA, "INTERLEAVE": True, "GROUPSUM": True}),
    (16, {**_DOT, "INTERLEAVE": False}), (16, {**_DOT, "INTERLEAVE": True}),
    (200, {**_DOT, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "INTERLEAVE": True}),
]


@torch.inference_mode()
def probe(args) -> None:
    """Before tuning: each path's error against x W^T in float32, its time next to dense and int4
    tinygemm on an 11008 x 4096 layer, and the compiled kernels' registers, spills and instruction
    counts (what to read first when a kernel is slower than its bandwidth floor)."""
    from hypercompress.kernels import triton_quant as tq
    from hypercompress.kernels.int4 import Int4Linear

    for bits in [int(b) for b in args.bits.split(",")]:
        module = layer(bits, 11008, 4096, 128)
        weight = module.dense_weight(torch.float32)
        dense = weight.to(torch.bfloat16)
        for tokens, config in PROBE_CONFIGS:
            x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
            error = float((call(module, x, config).float() - x.float() @ weight.t()).abs().max()
                          / (x.float() @ weight.t()).abs().max())
            line = {"bits": bits, "tokens": tokens, "config": config, "relative_error": f"{error:.1e}",
                    "us": round(time_us(lambda: call(module, x, config)), 1),
                    "dense_us": round(time_us(lambda: F.linear(x, dense)), 1)}
            if bits <= 4:
                codes, zero = module.tinygemm_form()
                path = Int4Linear(codes, module.scales, zero, 128, None, torch.bfloat16)
                line["tinygemm_us"] = round(time_us(lambda: path(x)), 1)
            print(json.dumps(line), flush=True)
        buffer = torch.empty(11008 * 4096, device="cuda", dtype=torch.bfloat16)
        zeros, kind = module.triton_zeros()
        us = time_us(lambda: tq.dequantize_weight(module.qweight, module.scales, zeros, bits, kind, 128,
                                                  11008, 4096, buffer))
        print(json.dumps({"bits": bits, "dequantize_us": round(us, 1)}), flush=True)
    for kernel in (tq._quant_matmul, tq._dequantize):
        try:  # Triton's compile cache: {device: (kernels, ...)} in 3.x
            compiled_kernels = list(kernel.device_caches[torch.cuda.current_device()][0].values())
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            print(f"no compiled kernels to read ({type(exc).__name__}: {exc})")
            continue
        for compiled in compiled_kernels:
            ptx = compiled.asm.get("ptx", "")
            print(json.dumps({"kernel": getattr(compiled, "name", "?"), "registers": getattr(compiled, "n_regs", None),
                              "spills": getattr(compiled, "n_spills", None),
                              **{op: ptx.count(op) for op in ("ld.global", "ld.shared", "st.shared", "ld.local",
                                                              "bar.sync", "mma", "wgmma", "cvt")}}), flush=True)


RUN_FIELDS = ("family", "machine", "torch", "triton", "command", "configs", "gemm_rows", "prefer", "best",
              "crossover", "baselines")


def refuse(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def read_run(file: str) -> dict:
    """A `run` output file, checked: one line naming what is wrong and exit 2 otherwise."""
    try:
        run_ = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        refuse(f"kernel_tune.py merge: {file}: not a readable JSON file ({type(exc).__name__}); "
               "pass the --out file of `kernel_tune.py run`")
    missing = [k for k in RUN_FIELDS if not isinstance(run_, dict) or k not in run_]
    if missing:
        refuse(f"kernel_tune.py merge: {file}: no {', '.join(missing)}; pass the --out file of "
               "`kernel_tune.py run`")
    return run_


def merge(args) -> None:
    """Each run's configs and gemm_rows into the shipped table (its family replaced), its timings
    into benchmarks/results/kernel_tune_<family>.json. `prefer` reaches the table only where the run
    also checked those configs' output on the GPU (`verified`): users get our kernels only where they
    were measured faster AND correct there."""
    runs = [read_run(file) for file in args.files]  # every file checked before anything is written
    for run_ in runs:  # no machine's paths in the repository
        run_["command"] = re.sub(r"--out \S+", "--out FILE", run_["command"])
    table_path = ROOT / "src/hypercompress/kernels/triton_configs.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    for run_ in runs:
        prefer = {k: v for k, v in run_["prefer"].items() if verified(run_, k)}
        table[run_["family"]] = {"configs": run_["configs"], "gemm_rows": run_["gemm_rows"], "prefer": prefer,
                                 "measured_on": f"{run_['machine']}, torch {run_['torch']}, triton {run_['triton']}",
                                 "command": run_["command"]}
        unchecked = sorted(set(run_["prefer"]) - set(prefer))
        if unchecked:
            print(f"{run_['family']}: {', '.join(unchecked)} not checked on the GPU (or off the bound): "
                  "the path they would replace stays the default")
        out = ROOT / "benchmarks" / "results" / f"kernel_tune_{run_['family']}.json"
        out.write_text(json.dumps({**{k: run_[k] for k in RUN_FIELDS[1:]}, "errors": run_.get("errors"),
                                   "prefer_verified": prefer}, indent=1) + "\n")
        print(f"wrote {out}")
    table_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {table_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("--bits", default="2,3,4", help="widths to tune, comma-separated")
    r.add_argument("--jobs", type=int, default=16, help="processes that compile the configs first")
    r.add_argument("--max-seconds", type=float, default=0, help="stop timing after this long (0: no limit)")
    r.add_argument("--out", required=True, help="the run's JSON (configs, crossover, preference, timings)")
    p = sub.add_parser("probe", help="correctness, time and compiled resources of one config per path")
    p.add_argument("--bits", default="4,2,3")
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.verb in ("run", "probe") and not torch.cuda.is_available():
        refuse(f"kernel_tune.py {args.verb} times kernels on an NVIDIA GPU and none is visible; run it on one "
               "(the tuned table is read on GPUs of the same family)")
    {"run": run, "probe": probe, "merge": merge}[args.verb](args)


if __name__ == "__main__":
    main()
