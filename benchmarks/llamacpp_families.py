"""llama.cpp on our GGUF export of the families and tokenizers transformers' GGUF loader cannot fully
check: Gemma 2 and Gemma 3 (settings llama.cpp hard-codes, norms stored as 1 + w, sliding windows)
and SentencePiece BPE tokenizers (Llama-2 / Gemma style, scores in merge order).

Run (main venv):  python benchmarks/llamacpp_families.py
Needs llama-cpp-python in benchmarks/.venv-llamacpp (see benchmarks/llamacpp.py for the two lines).
Writes benchmarks/results/llamacpp_families.json.

Per case: a tiny random model from transformers' own config class (tests/test_export_gguf.py's
`tiny` / `gemma`: hidden 64, 2 blocks, Gemma head_dim 256, window 16) with a SentencePiece BPE of 400
ids trained in-process on three lines (`sentencepiece`), RTN w4 g32 float zero (stored exactly as
Q4_1), exported twice: as is, and with every weight F32 (`--gguf-type F32 --force-type`). llama.cpp
(`Llama(logits_all=True)`, KV cache F32) scores 40 random ids (past the window); ours: the artifact
from hypercompress.load, float32. Reported: max |logit difference| / max |logit|, top-1 agreement,
and whether llama.cpp's tokenization of 8 strings equals the tokenizer's own (no BOS).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LLAMA_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
TEXTS = ["the lazy fox says hello 42", "two  spaces, and a tab\tthere", "caf\u00e9 \u2603 nine dogs",
         "the quick brown fox", "hello there. The end!", "stitch the nine times", "dogxfoz jumpz", "1234 5678"]
RECIPE = [{"method": "rtn", "bits": 4, "group_size": 32, "zero_point": "float"}]
TITLE = "llama.cpp on our GGUF export of Gemma 2, Gemma 3 and Llama with SentencePiece BPE tokenizers (issue 28)"


def section(data: dict) -> list[str]:
    """The RESULTS.md section of results/llamacpp_families.json."""
    parts = [f"## {data.get('title', TITLE)}", "", f"- protocol: {' '.join(data['protocol'].split())}",
             f"- machine: {data['machine']}", f"- command: `{data['command']}` (commit {data['commit']})", "",
             "| case | export | max abs logit difference | max abs logit | top-1 agreement | tokenization equal |",
             "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        parts.append(f"| {row['case']} | {row['export']} | {row['max_abs_logit_diff']:.2e} | {row['max_abs_logit']:.3f} | "
                     f"{row['top1_agreement']:.3f} | {row['tokenization_equal']}/{row['tokenization_strings']} |")
    return parts + [""]


def llama_side(job_file: str, out_file: str) -> None:
    """Run by the llama.cpp venv's python: logits of the ids and tokenizations, per GGUF file."""
    import numpy as np
    import llama_cpp

    out = {}
    for name, job in json.loads(Path(job_file).read_text()).items():
        llm = llama_cpp.Llama(model_path=job["gguf"], logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                              type_k=0, type_v=0, verbose=False)  # type 0: F32 KV cache
        llm.eval(job["ids"])
        out[name] = {"logits": np.asarray(llm.scores[:len(job["ids"])]).tolist(),
                     "tokens": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]]}
    Path(out_file).write_text(json.dumps(out))


def build(work: Path) -> dict:
    import torch
    from transformers import GemmaTokenizer, LlamaTokenizer

    sys.path.insert(0, str(ROOT.parent / "tests"))
    from test_export_gguf import gemma, make_artifact, sentencepiece, tiny  # the tests' tiny models

    import hypercompress
    from hypercompress.exporters import export

    jobs, ours = {}, {}
    for arch in ("gemma2", "gemma3", "llama"):
        cls, specials = ((LlamaTokenizer, ["<unk>", "<s>", "</s>"]) if arch == "llama"
                         else (GemmaTokenizer, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
        tokenizer = sentencepiece(cls, specials, vocab_size=400)
        model = tiny("llama") if arch == "llama" else gemma(arch)
        model.resize_token_embeddings(400, mean_resizing=False)
        model.config.update(dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id or 0))
        artifact = make_artifact(work / arch, tokenizer, RECIPE, model=model)
        ids = torch.randint(3, 400, (1, 40), generator=torch.Generator().manual_seed(0))
        loaded, _ = hypercompress.load(artifact)
        with torch.no_grad():
            ours[arch] = loaded(ids).logits[0].numpy()
        expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        for variant, kwargs in (("Q4_1", {}), ("F32", {"gguf_type": "F32", "force_type": True})):
            report = export(artifact, "gguf", work / arch / variant, **kwargs)
            jobs[f"{arch} {variant}"] = {"gguf": str(work / arch / variant / "model.gguf"), "ids": ids[0].tolist(),
                                         "texts": TEXTS, "expected": expected, "arch": arch,
                                         "summary": report["summary"]}
    return jobs, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(ROOT / "results" / "llamacpp_families.json"))
    args = parser.parse_args()
    if not LLAMA_PYTHON.exists():
        sys.exit(f"{LLAMA_PYTHON} is missing: create it as benchmarks/llamacpp.py's docstring says")
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs, ours = build(work)
        (work / "job.json").write_text(json.dumps(jobs))
        subprocess.run([str(LLAMA_PYTHON), __file__, "llama-side", str(work / "job.json"), str(work / "out.json")],
                       check=True)
        theirs = json.loads((work / "out.json").read_text())
    rows = []
    for name, job in jobs.items():
        a, b = ours[job["arch"]], np.asarray(theirs[name]["logits"])
        rows.append({"case": name, "export": job["summary"],
                     "max_abs_logit_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(a).max()),
                     "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
                     "tokenization_equal": sum(x == y for x, y in zip(theirs[name]["tokens"], job["expected"])),
                     "tokenization_strings": len(TEXTS)})
        print(f"{name:12s} max |diff| {rows[-1]['max_abs_logit_diff']:.2e} of max |logit| "
              f"{rows[-1]['max_abs_logit']:.3f}, top-1 {rows[-1]['top1_agreement']:.3f}, tokenization "
              f"{rows[-1]['tokenization_equal']}/{len(TEXTS)} equal")
    llama_version = subprocess.run([str(LLAMA_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    import torch
    import transformers

    result = {"title": TITLE, "protocol": __doc__.split("\n\n")[-1].strip(), "command": "python benchmarks/llamacpp_families.py",
              "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
                         f"transformers {transformers.__version__}, gguf {importlib.metadata.version('gguf')}, "
                         f"llama-cpp-python {llama_version}",
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(), "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "llama-side":
        llama_side(sys.argv[2], sys.argv[3])
    else:
        main()
