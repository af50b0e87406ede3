"""Artifact fuzzer: corrupt or tamper with valid tiny artifacts and check what `load` and `inspect` say.

Each variant is a copy of a valid artifact with one mutation (truncation, bit flip, a lying safetensors
header, a manifest / config / layout edit, a deleted, emptied, swapped or linked file, a FIFO, a link
to a huge sparse file), then, for some, "resealed": the manifest's hashes and weights size recomputed,
as a careless tool or an attacker would. The oracle, per variant:
- crash: load or inspect raised anything but UserError; hang: either ran past the time limit;
- memory: the process's peak RSS grew by more than MEMORY_LIMIT during the variant;
- inconsistent: inspect accepted what load refused, or the reverse;
- silent_change: load accepted a variant that was NOT resealed and its logits differ from the saved
  artifact's (a resealed, structurally valid edit is counted apart as accepted_resealed_change: the
  file says what it says).

Run as a script (`python tests/artifact_fuzz.py --variants 700 --seed 1 --json benchmarks/results/fuzz.json`) or
through tests/test_fuzz.py, which runs it in a subprocess with a few hundred variants.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TIME_LIMIT_S = 30  # per load or inspect call; a tiny artifact takes well under a second
MEMORY_LIMIT = 1 << 30  # peak RSS growth per variant (bytes)
HUGE = 200 << 30  # a sparse file this size stands for a link to a huge file
# (label, architecture, recipe, lossless level)
ARTIFACTS = [
    ("llama-rtn", "llama", [{"method": "rtn", "bits": 4, "group_size": 32}], None),
    ("llama-gptq-w3", "llama", [{"method": "gptq", "bits": 3, "group_size": 32}], None),
    ("llama-sparse-2of4", "llama", [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}], None),
    ("llama-svd", "llama", [{"method": "svd", "keep": 0.5}], None),
    ("llama-factor-embedding", "llama", [{"method": "factor_embedding", "rank": 8, "targets": ["embed_tokens$"]}], None),
    ("llama-structured", "llama", [{"method": "structured", "mlp_keep": 0.5}], None),
    ("llama-kv-lowrank", "llama", [{"method": "kv_lowrank", "keep": 0.25}], None),
    ("gpt2-rtn", "gpt2", [{"method": "rtn", "bits": 4, "group_size": 32}], None),
    ("gpt2-gptq", "gpt2", [{"method": "gptq", "bits": 4, "group_size": 32}], None),
    ("gpt2-rtn-embed", "gpt2", [{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["wte$"]}], None),
    ("llama-rtn-lora", "llama", [{"method": "rtn", "bits": 4, "group_size": 32},
                                 {"method": "distill", "steps": 2, "lora_rank": 4}], None),
    ("llama-hypernet", "llama", [{"method": "hypernet", "warm_steps": 2, "steps": 2, "value_bits": 8}], None),
    ("llama-rtn-lossless", "llama", [{"method": "rtn", "bits": 4, "group_size": 32}], 3),
    ("gpt2-sparse-lossless", "gpt2", [{"method": "sparsegpt", "sparsity": 0.5}], 3),
]


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test hides it."""


def build_artifacts(root: Path) -> dict[str, Path]:
    """The valid artifacts the variants start from (tiny random models of tests/conftest.py)."""
    from conftest import make_model, make_tokenizer

    from hypercompress.storage import artifact
    from hypercompress.apply import apply_recipe
    from hypercompress.modules import count_params
    from hypercompress.recipe import Recipe

    paths = {}
    for label, arch, steps, lossless in ARTIFACTS:
        torch.manual_seed(0)
        model = make_model(arch)
        params = count_params(model)
        recipe = Recipe.from_list(steps)
        calib = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
        apply_recipe(model, recipe, calib, batch_size=4)
        artifact.round_to_storage(model)
        paths[label] = artifact.save(model, make_tokenizer(), root / label, recipe=recipe.to_list(),
                                     original_params=params, lossless=lossless)
    return paths


# ---------------------------------------------------------------- mutations: (dir, rng) -> description
def _read_json(file: Path):
    return json.loads(file.read_text())


def _write_json(file: Path, data) -> None:
    file.write_text(json.dumps(data))


def truncate(d: Path, rng: random.Random) -> str:
    file = d / rng.choice(["model.safetensors", "model.safetensors", "hypercompress.json", "config.json",
                           "tokenizer.json"])
    size = file.stat().st_size
    keep = rng.choice([0, 7, 8, 100, rng.randrange(max(size, 1)), size - 1])
    with open(file, "r+b") as handle:
        handle.truncate(max(keep, 0))
    return f"truncate {file.name} to {keep}"


def bit_flip(d: Path, rng: random.Random) -> str:
    file = d / rng.choice(["model.safetensors"] * 4 + ["hypercompress.json", "config.json", "tokenizer.json"])
    data = bytearray(file.read_bytes())
    if not data:
        return "bit flip in an empty file"
    if file.name == "model.safetensors" and rng.random() < 0.5:  # the header
        header = struct.unpack("<Q", bytes(data[:8]))[0] if len(data) >= 8 else 0
        position = rng.randrange(min(len(data), 8 + header))
    else:
        position = rng.randrange(len(data))
    data[position] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))
    return f"bit flip in {file.name} at {position}"


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def header_length_lie(d: Path, rng: random.Random) -> str:
    file = d / "model.safetensors"
    raw = bytearray(file.read_bytes())
    length = struct.unpack("<Q", raw[:8])[0]
    lie = rng.choice([length + 1, length - 1, 0, len(raw), 1 << 40, (1 << 64) - 1])
    raw[:8] = struct.pack("<Q", lie)
    file.write_bytes(bytes(raw))
    return f"header length {length} -> {lie}"


def header_dtype_lie(d: Path, rng: random.Random) -> str:
    file = d / "model.safetensors"
    header, data = _header(file)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    old = entry["dtype"]
    entry["dtype"] = rng.choice(["U16", "F8_E4M3", "BF16", "F16", "I8", "U8", "F32", "I64", "BOOL"])
    size = {"U16": 2, "F8_E4M3": 1, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F32": 4, "I64": 8, "BOOL": 1}
    if rng.random() < 0.7 and entry["shape"]:  # keep the byte count: a self-consistent lie
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        width = size[entry["dtype"]]
        if nbytes % width == 0:
            entry["shape"] = [nbytes // width]
    _write_header(file, header, data)
    return f"dtype of {name} {old} -> {entry['dtype']} shape {entry['shape']}"


def header_shape_lie(d: Path, rng: random.Random) -> str:
    file = d / "model.safetensors"
    header, data = _header(file)
    name = rng.choice([k for k in header if k != "__metadata__"])
    shape = header[name]["shape"]
    choice = rng.randrange(3)
    if choice == 0 and len(shape) == 2:
        header[name]["shape"] = shape[::-1]
    elif choice == 1:
        header[name]["shape"] = [int(torch.tensor(shape).prod())] if shape else [1]
    else:
        header[name]["shape"] = [s + rng.choice([-1, 1]) for s in shape] or [2]
    _write_header(file, header, data)
    return f"shape of {name} {shape} -> {header[name]['shape']}"


BAD_VALUES = ["4", 4.5, None, True, [], {}, -1, 0, 200_000_000, 10 ** 18, 2 ** 31, 9, 33, 17, "int8", 1]


def manifest_edit(d: Path, rng: random.Random) -> str:
    file = d / "hypercompress.json"
    manifest = _read_json(file)
    modules = manifest["modules"]
    choice = rng.randrange(14)
    if choice <= 5 and modules:  # a layout value
        name = rng.choice(sorted(modules))
        layout = modules[name]["layout"]
        if choice <= 3 and layout:
            key = rng.choice(sorted(layout))
            value = rng.choice(BAD_VALUES)
            if isinstance(layout[key], dict) and layout[key].get("layout"):  # a nested base
                inner = layout[key]["layout"]
                key = f"{key}.{rng.choice(sorted(inner))}"
                inner[key.split('.')[-1]] = value
            else:
                layout[key] = value
            what = f"layout {name}.{key} = {value!r}"
        elif choice == 4 and layout:
            key = rng.choice(sorted(layout))
            del layout[key]
            what = f"layout {name} without {key}"
        else:
            layout["unknown_key"] = 1
            what = f"layout {name} with an unknown key"
    elif choice == 6 and modules:
        name = rng.choice(sorted(modules))
        modules[name]["kind"] = rng.choice(["quant", "sparse", "lowrank", "quant_embedding", "tied_head",
                                            "hypernet", "kan", "nonsense", 7])
        what = f"kind of {name} -> {modules[name]['kind']!r}"
    elif choice == 7 and modules:
        name = rng.choice(sorted(modules))
        if rng.random() < 0.5:
            del modules[name]
            what = f"module {name} removed"
        else:
            new = rng.choice(["model.layers.7.mlp.up_proj", "lm_head", "model.norm", "", "a..b", "model"])
            modules[new] = modules.pop(name)
            what = f"module {name} renamed {new!r}"
    elif choice == 8:
        aliases = manifest["aliases"]
        if aliases and rng.random() < 0.6:
            key = rng.choice(sorted(aliases))
            aliases[key] = rng.choice(["model.norm.weight", "transformer.ln_f.weight", "nothing.here",
                                       "lm_head.weight"])
            what = f"alias {key} -> {aliases[key]}"
        else:
            aliases["lm_head.weight"] = "model.embed_tokens.weight"
            what = "alias added"
    elif choice == 9:
        files = manifest["files"]
        op = rng.randrange(4)
        if op == 0:
            files["../../../../etc/passwd"] = "0" * 64
            what = "files lists a path outside"
        elif op == 1:
            (d / "huge.bin").touch()
            os.truncate(d / "huge.bin", HUGE)
            files["huge.bin"] = "0" * 64
            what = "files lists a huge file"
        elif op == 2:
            del files[rng.choice(sorted(files))]
            what = "a files entry removed"
        else:
            files["model.safetensors"] = "f" * 64
            what = "a wrong hash"
    elif choice == 10:
        key = rng.choice(["tensor_bits", "safetensors_bytes", "bits_per_weight"])
        manifest["totals"][key] = rng.choice(BAD_VALUES)
        what = f"totals.{key} edited"
    elif choice == 11:
        key = rng.choice(["format_version", "original_params", "storage_dtype", "architecture", "format",
                          "modules", "aliases", "recipe"])
        value = rng.choice(BAD_VALUES + ["bfloat16", "gpt2", "llama"])
        if rng.random() < 0.3:
            manifest.pop(key, None)
            what = f"{key} removed"
        else:
            manifest[key] = value
            what = f"{key} = {value!r}"
    elif choice == 12 and manifest.get("lossless"):
        entries = manifest["lossless"]["tensors"]
        name = rng.choice(sorted(entries))
        op = rng.randrange(3)
        if op == 0:
            entries[name]["planes"][0][0] = "raw" if entries[name]["planes"][0][0] == "zstd" else "zstd"
        elif op == 1:
            entries[name]["planes"][0][1] += rng.choice([-1, 1, 10 ** 12])
        else:
            entries[name]["shape"] = [rng.choice([0, 1, 10 ** 9])] + entries[name]["shape"][1:]
        what = f"lossless entry {name} edited"
    else:
        manifest["dense_dtypes"] = {rng.choice(["model.norm.weight", "transformer.ln_f.weight", "x"]): "float32"}
        what = "dense_dtypes added"
    _write_json(file, manifest)
    return what


def config_edit(d: Path, rng: random.Random) -> str:
    file = d / "config.json"
    config = _read_json(file)
    base = config.get("base_config", config)
    key = rng.choice(["num_hidden_layers", "n_layer", "hidden_size", "n_embd", "vocab_size", "model_type",
                      "intermediate_size", "num_attention_heads", "tie_word_embeddings", "base_config"])
    if key == "base_config":
        config.pop("base_config", None)
        what = "base_config removed"
    else:
        value = rng.choice([0, -1, 1, 3, 10 ** 9, "x", None, "llama", "gpt2", "bert", True])
        base[key] = value
        what = f"config {key} = {value!r}"
    _write_json(file, config)
    return what


def file_edit(d: Path, rng: random.Random) -> str:
    name = rng.choice(["model.safetensors", "hypercompress.json", "config.json", "tokenizer.json",
                       "tokenizer_config.json"])
    file = d / name
    op = rng.randrange(6)
    if op == 0:
        file.unlink()
        return f"{name} deleted"
    if op == 1:
        file.write_bytes(b"")
        return f"{name} emptied"
    if op == 2:
        other = d / rng.choice(["model.safetensors", "config.json", "tokenizer.json"])
        data = other.read_bytes()
        file.write_bytes(data)
        return f"{name} replaced by {other.name}"
    if op == 3:
        huge = d.parent / f"{d.name}.huge"
        huge.touch()
        os.truncate(huge, HUGE)
        file.unlink()
        file.symlink_to(huge)
        return f"{name} linked to a {HUGE >> 30} GiB file"
    if op == 4:
        file.unlink()
        os.mkfifo(file)
        return f"{name} is a FIFO"
    file.unlink()
    file.symlink_to("/dev/zero")
    return f"{name} linked to /dev/zero"


def extra_file(d: Path, rng: random.Random) -> str:
    name = rng.choice(["tokenizer.model", "vocab.json", "README.md", "generation_config.json"])
    (d / name).write_text("{}")
    return f"unlisted {name} added"


MUTATIONS = [(truncate, 2), (bit_flip, 3), (header_length_lie, 1), (header_dtype_lie, 2), (header_shape_lie, 2),
             (manifest_edit, 6), (config_edit, 2), (file_edit, 2), (extra_file, 1)]


def reseal(d: Path) -> bool:
    """Recompute the manifest's hashes and weights size after an edit, where it still parses."""
    file = d / "hypercompress.json"
    if not file.is_file() or file.is_symlink():  # a FIFO or link: opening it would block or read 200 GiB
        return False
    try:
        manifest = _read_json(file)
        files = manifest["files"]
        for name in list(files):
            target = d / name
            if target.is_file() and not target.is_symlink() and target.stat().st_size < (64 << 20) \
                    and name.count("/") == 0:
                files[name] = hashlib.sha256(target.read_bytes()).hexdigest()
        weights = d / "model.safetensors"
        if weights.is_file() and not weights.is_symlink():
            manifest["totals"]["safetensors_bytes"] = weights.stat().st_size
        _write_json(file, manifest)
        return True
    except Exception:
        return False


def make_variant(source: Path, out: Path, rng: random.Random) -> dict:
    shutil.copytree(source, out, symlinks=True)
    mutation = rng.choices([m for m, _ in MUTATIONS], weights=[w for _, w in MUTATIONS])[0]
    try:
        what = mutation(out, rng)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, OSError) as exc:
        what = f"{mutation.__name__} not applicable ({type(exc).__name__})"
    sealed = rng.random() < 0.4 and reseal(out)
    return {"mutation": mutation.__name__, "what": what, "resealed": sealed}


# ---------------------------------------------------------------- the oracle
def _alarm(*_):
    raise Hang()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _call(fn):
    """(outcome, value, detail): outcome ok / refused / crash / hang."""
    from hypercompress.errors import UserError

    signal.alarm(TIME_LIMIT_S)
    try:
        return "ok", fn(), ""
    except UserError as exc:
        return "refused", None, str(exc)[:300]
    except Hang:
        return "hang", None, ""
    except BaseException as exc:  # noqa: BLE001 - any other exception is what we count
        return "crash", None, "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300] + \
            " @ " + traceback.extract_tb(exc.__traceback__)[-1].filename.split("/")[-1] + ":" + \
            str(traceback.extract_tb(exc.__traceback__)[-1].lineno)
    finally:
        signal.alarm(0)


def judge(variant: Path, reference: torch.Tensor, tokens: torch.Tensor, resealed: bool) -> dict:
    from hypercompress.storage import artifact
    from hypercompress.storage.inspection import inspect as inspect_artifact

    before = _peak_rss()
    load, logits, load_detail = _call(lambda: artifact.load(variant, fast=False)[0](tokens).logits)
    inspect, _, inspect_detail = _call(lambda: inspect_artifact(variant))
    grown = _peak_rss() - before
    same = load == "ok" and logits.shape == reference.shape and torch.equal(logits, reference)
    if "crash" in (load, inspect):
        verdict = "crash"
    elif "hang" in (load, inspect):
        verdict = "hang"
    elif grown > MEMORY_LIMIT:
        verdict = "memory"
    elif (load == "ok") != (inspect == "ok"):
        verdict = "inconsistent"
    elif load == "ok" and not same:
        verdict = "accepted_resealed_change" if resealed else "silent_change"
    else:
        verdict = "accepted_same" if load == "ok" else "refused"
    return {"verdict": verdict, "load": load, "inspect": inspect, "load_detail": load_detail,
            "inspect_detail": inspect_detail, "rss_growth": grown}


BAD = ("crash", "hang", "memory", "inconsistent", "silent_change")


def run(variants: int, seed: int, workdir: Path) -> dict:
    """Build the artifacts, make `variants` mutated copies (round-robin over them) and judge each."""
    from hypercompress.storage import artifact

    signal.signal(signal.SIGALRM, _alarm)
    started = time.time()
    sources = build_artifacts(workdir / "valid")
    tokens = torch.randint(1, 121, (1, 16), generator=torch.Generator().manual_seed(seed))
    references = {label: artifact.load(path, fast=False)[0](tokens).logits for label, path in sources.items()}
    rng = random.Random(seed)
    rows = []
    for index in range(variants):
        label = sorted(sources)[index % len(sources)]
        out = workdir / "variants" / f"{index:04d}-{label}"
        out.parent.mkdir(parents=True, exist_ok=True)
        row = {"index": index, "artifact": label, **make_variant(sources[label], out, rng)}
        row.update(judge(out, references[label], tokens, row["resealed"]))
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
        for stray in out.parent.glob(f"{out.name}.huge"):
            stray.unlink()
    counts: dict[str, int] = {}
    by_mutation: dict[str, dict[str, int]] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
        tally = by_mutation.setdefault(row["mutation"], {})
        tally[row["verdict"]] = tally.get(row["verdict"], 0) + 1
    return {"variants": variants, "seed": seed, "artifacts": sorted(sources), "counts": counts,
            "by_mutation": by_mutation, "resealed": sum(r["resealed"] for r in rows),
            "seconds": round(time.time() - started, 1), "environment": _environment(),
            "bad": [r for r in rows if r["verdict"] in BAD], "rows": rows}


def _environment() -> dict:
    import platform
    import subprocess

    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(), "commit": commit or None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=700)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--rows", action="store_true", help="keep every variant's row in --json (large)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hc-fuzz-") as tmp:
        result = run(args.variants, args.seed, Path(tmp))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)[:20000])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        kept = result if args.rows else {k: v for k, v in result.items() if k != "rows"}
        args.json.write_text(json.dumps(kept, indent=1) + "\n")


if __name__ == "__main__":
    main()
