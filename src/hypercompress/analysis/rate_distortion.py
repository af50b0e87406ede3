"""Rate-distortion: perplexity against whole-model bits per weight for every run in a folder.

Points come from two kinds of JSON found under the folder (recursively):
- benchmark results (`{"title": ..., "rows": [{"label", "bits_per_weight", "ppl"}, ...]}`): one
  series per file;
- artifact summaries (`summary.json` written by `hypercompress compress`): each artifact's final
  branch is one point of the series "artifacts", when its quality was measured (--eval);
- evaluations kept with an artifact (`evaluations.json` beside its manifest, written by
  `hypercompress evaluate ARTIFACT`; storage/kept.py): one point per artifact (label: its folder's name)
  in a series per evaluation text and window count, "evaluate TEXT (W×L tokens, DTYPE)", so that only
  perplexities measured on the same windows share a series (an artifact's latest evaluation there).
  Kept rows without a perplexity (tasks only) are not plotted.
An artifact's bits per weight is its file's (the manifest's totals: model.safetensors with its header
x 8 / original parameters), for its summary point too; a summary.json outside an artifact gives its
last branch's. Both axes are logarithmic: bpw spans 16 down to a few hundredths, perplexity spans orders of
magnitude once a model breaks.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Callable

from ..storage.reader import MANIFEST, read_document, read_manifest_fields
from ..storage.atomic import replace_file
from ..errors import UserError

Series = dict[str, list[tuple[float, float, str]]]  # name -> (bpw, ppl, label)


def collect(folder: Path, warn: Callable[[str], None] | None = None) -> Series:
    """Every (bpw, ppl, label) point under `folder`, grouped into series (anchor rows, copies of
    another table's rows, once).

    The folder holds other JSON too (configs, manifests, tokenizers, other reports): a file that is
    neither a results table nor an artifact summary is passed over. One that cannot be read as JSON
    (a FIFO, a link to a device, larger than any results file, not UTF-8 or not JSON) or that is a
    results table or summary with fields of the wrong type is skipped, each with a one-line `warn`
    (default: warnings.warn) naming the file and the problem."""
    if not folder.is_dir():
        raise UserError(f"results folder not found: {folder}; pass a directory of results/*.json or artifacts")
    if warn is None:
        warn = functools.partial(warnings.warn, stacklevel=2)
    series: Series = {}
    skipped = 0
    for file in sorted(folder.rglob("*.json")):
        try:
            if _is_kept_evaluations(file):
                problems: list[str] = []
                for name, points in _kept_points(file, problems.append).items():
                    series.setdefault(name, []).extend(points)
                for problem in problems:
                    warn(problem)
                skipped += bool(problems)
                continue
            found = _points(file)
        except UserError as exc:
            warn(str(exc))
            skipped += 1
            continue
        if found is None:
            continue
        name, points = found
        if name is None:
            series.setdefault("artifacts", []).extend(points)
        else:
            series[name] = points
    if not series:
        note = f" ({skipped} malformed file{'s' if skipped != 1 else ''} skipped)" if skipped else ""
        raise UserError(f"no results with bits_per_weight and ppl under {folder}{note}; run a benchmark, "
                        "compress with --eval or evaluate an artifact first")
    return series


SKIPPED = "skipped it (fix or remove the file to plot it)"


def _points(file: Path) -> tuple[str | None, list[tuple[float, float, str]]] | None:
    """The series name (None: the shared "artifacts" series) and points of one JSON file, None when
    it is neither a results table nor an artifact summary or has no measured point. Raises UserError
    (ending in SKIPPED) for an unreadable or malformed one."""
    text = read_document(file, fix=SKIPPED)  # a regular file, size bounded before it is opened
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(f"{file} is not JSON; {SKIPPED}") from None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("rows"), list):
        title = data.get("title")
        if title is not None and not isinstance(title, str):
            raise _malformed(file, "'title'", title, "a string")
        points = []
        for index, row in enumerate(data["rows"]):
            where = f"rows[{index}]"
            if not isinstance(row, dict):
                raise _malformed(file, where, row, "an object")
            label = row.get("label", "")
            if label is None:
                label = ""
            if not isinstance(label, str):
                raise _malformed(file, f"{where}.label", label, "a string")
            bpw = _measure(file, row, where, "bits_per_weight")
            ppl = _measure(file, row, where, "ppl")
            if bpw is not None and ppl is not None and "anchor" not in label:  # anchors repeat another table's row
                points.append((bpw, ppl, label))
        return (title or file.stem, points) if points else None
    if file.name == "summary.json" and isinstance(data.get("branches"), list) and data["branches"]:
        last = data["branches"][-1]
        where = f"branches[{len(data['branches']) - 1}]"
        if not isinstance(last, dict):
            raise _malformed(file, where, last, "an object")
        ppl = _measure(file, last, where, "ppl")
        if ppl is None:
            return None  # quality not measured (no --eval)
        bpw = _measure(file, last, where, "bits_per_weight")
        if bpw is None:
            raise UserError(f"{file}: {where} has a ppl but no positive bits_per_weight; {SKIPPED}")
        return None, [(_artifact_bpw(file.parent) or bpw, ppl, file.parent.name)]
    return None


def _is_kept_evaluations(file: Path) -> bool:
    from ..storage.kept import EVALUATIONS

    return file.name == EVALUATIONS and (file.parent / MANIFEST).is_file()


def _artifact_bpw(folder: Path) -> float | None:
    """The bits per weight of the artifact `folder` is (its manifest's totals, the file's), None when
    it has no manifest; UserError (ending in SKIPPED) for a manifest that is not one."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return float(read_manifest_fields(folder)["totals"]["bits_per_weight"])
    except UserError as exc:
        raise UserError(f"{exc} ({SKIPPED})") from None


def _kept_points(file: Path, warn: Callable[[str], None]) -> dict[str, list[tuple[float, float, str]]]:
    """Series name -> the one point of the artifact holding `file` (its evaluations.json): for each
    evaluation text and window count, its latest kept perplexity at the artifact's bits per weight.
    A file or rows that cannot be read are `warn`ed about and left out (storage/kept.py)."""
    from ..storage.kept import read_kept

    bpw = _artifact_bpw(file.parent)  # before the rows: a refusal here leaves no warning unsaid
    rows = [row for row in read_kept(file.parent, warn, fix=SKIPPED) if row.ppl is not None]
    latest = {_series_name(row): (bpw, float(row.ppl), file.parent.name) for row in rows}
    return {name: [point] for name, point in latest.items() if bpw and bpw > 0}


def _series_name(row) -> str:
    """'evaluate TEXT (W×L tokens, DTYPE)': perplexities in one series were measured on the same
    windows; a row without them (written by hand) is its own series, named by its protocol."""
    if row.data and row.windows and row.seq_len:
        return f"evaluate {row.data} ({row.windows}×{row.seq_len} tokens{', ' + row.dtype if row.dtype else ''})"
    return f"evaluate: {(row.protocol or 'unknown protocol')[:80]}"


def _measure(file: Path, row: dict, where: str, key: str) -> float | None:
    """row[key] as a positive finite number; None when it is absent, null or not positive and finite
    (not measured, or a model broken past plotting); UserError when it is not a number at all."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _malformed(file, f"{where}.{key}", value, "a number")
    try:
        value = float(value)
    except OverflowError:  # an integer past float range
        return None
    return value if math.isfinite(value) and value > 0 else None


def _malformed(file: Path, field: str, value: object, expected: str) -> UserError:
    return UserError(f"{file}: {field} is {type(value).__name__}, not {expected}; {SKIPPED}")


def plot(series: Series, out: Path, title: str = "Rate-distortion: perplexity vs bits per weight") -> Path:
    """Write the PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6), dpi=120)
    for name, points in series.items():
        points = sorted(points)
        axes.plot([p[0] for p in points], [p[1] for p in points], "o", label=name, alpha=0.8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("bits per weight (whole model, all stored bytes x 8 / original parameters)")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, lambda tmp: figure.savefig(tmp, format=out.suffix.lstrip(".") or None))
    plt.close(figure)
    return out
