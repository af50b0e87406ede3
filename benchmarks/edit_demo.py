"""Concept edit on SmolLM2-135M: numbers written out as words, erased against the same sentences
with the numbers as digits (`hypercompress edit`, directional ablation and LEACE).

    pip install num2words        # builds the contrast sentences (benchmark only)
    python benchmarks/edit_demo.py --model smollm2-135m     # -> results/edit.json + RESULTS.md

Data (all from ../shared/data, built here, never written to the repository):
- concept: sentences of the WikiText-2 *validation* text holding whole numbers (no decimals, no
  "@,@" groupings) with each number spelled out by num2words ("1996" -> "one thousand, nine hundred
  and ninety-six"); contrast: the same sentences as they are, digits. Only the concept differs.
- unrelated (the KL budget is checked on it): validation sentences holding no digit at all;
- heldout (never seen by the edit): WikiText-2 *test* sentences holding no digit (evaluation only).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, TEST_TEXT, machine, write_json  # noqa: E402

NUMBER = re.compile(r"(?<![\d@.,])\b\d{1,4}\b(?![\d@]| @)")


def sentences(text: str) -> list[str]:
    """Sentences of a WikiText-style text (split at ' . '), headings and short pieces dropped."""
    out = []
    for paragraph in text.splitlines():
        paragraph = paragraph.strip()
        if not paragraph or paragraph.startswith("="):
            continue
        for piece in paragraph.split(" . "):
            piece = piece.strip()
            if 8 <= len(piece.split()) <= 40:
                out.append(piece.rstrip(" .") + " .")
    return out


def concept_pairs(text: str, count: int) -> tuple[list[str], list[str]]:
    """(digits, words): sentences with whole numbers, and the same with the numbers spelled out."""
    from num2words import num2words

    digits, words = [], []
    for sentence in sentences(text):
        if "@" in sentence or not NUMBER.search(sentence):
            continue
        spelled = NUMBER.sub(lambda m: num2words(int(m.group())), sentence)
        if re.search(r"\d", spelled):
            continue  # a number the pattern left (e.g. "3rd"): not a clean pair
        digits.append(sentence)
        words.append(spelled)
        if len(digits) == count:
            break
    return digits, words


def write_data(folder: Path, pairs: int) -> dict[str, Path]:
    valid, test = CALIB_TEXT.read_text(), TEST_TEXT.read_text()
    digits, words = concept_pairs(valid, pairs)
    files = {"concept": words, "contrast": digits,
             "unrelated": [s for s in sentences(valid) if not re.search(r"\d", s)],
             "heldout": [s for s in sentences(test) if not re.search(r"\d", s)]}
    paths = {}
    for name, lines in files.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=["ablation", "leace"])
    parser.add_argument("--max-directions", type=int, default=8)
    parser.add_argument("--kl-budget", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import hypercompress
    from hypercompress.analysis.edit_report import json_safe

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_data(Path(tmp), args.pairs)
        for method in args.methods:  # what `hypercompress edit MODEL --concept ... --method M` runs
            report = hypercompress.edit(args.model, paths["concept"], paths["contrast"], unrelated=paths["unrelated"],
                                        heldout=paths["heldout"], method=method, max_directions=args.max_directions,
                                        kl_budget=args.kl_budget, device=args.device,
                                        progress=lambda section, done, total, note="":
                                        print(f"{method}: {section} {done}/{total}", flush=True))
            runs.append({"method": method, "report": json_safe(report)})
    shown = f"python benchmarks/edit_demo.py --model {args.model} --pairs {args.pairs} --methods " \
            f"{' '.join(args.methods)} --max-directions {args.max_directions} --kl-budget {args.kl_budget} " \
            f"--device {args.device}"
    write_json("edit", {"title": "Concept edit: numbers spelled out as words, erased (SmolLM2-135M)", "model": args.model,
                        "machine": machine(), "command": shown, "pairs": args.pairs, "runs": runs})
    from report import render

    render()


if __name__ == "__main__":
    main()
