"""Writers for other runtimes' formats: a hypercompress artifact -> a directory another tool loads.

| format | writer | who loads it |
|---|---|---|
| `hf` | exporters/hf.py | any tool: dense safetensors + config + tokenizer (transformers, vLLM, llama.cpp's converter) |
| `compressed-tensors` | exporters/compressed_tensors.py | transformers (with the `compressed-tensors` package) and vLLM |
| `gguf` | exporters/gguf_writer.py | llama.cpp (and transformers' GGUF loader) |

Each writer is `write(model, tokenizer, manifest, out_dir, **options) -> dict` (a report: what was
stored how, and any measured re-quantization cost), given the artifact as `artifact.load` returns it
(CPU, float32) and an empty temporary directory; it raises UserError naming the module kind and the
format that can hold it when the format cannot hold one. `export()` below does the rest: refuses an
existing --out, writes into a temporary directory beside it and renames it into place, so nothing is
ever half-written.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Format:
    """An export format: its writer module (export/<module>.py, whose `write` takes exactly these
    keyword `options`), per option what it does (the CLI's `--option-name` help), and the options
    an option needs beside it (`requires`)."""

    module: str
    options: dict[str, str]
    requires: dict[str, str] = field(default_factory=dict)


FORMATS = {
    "hf": Format("hf", {"dtype": "bfloat16 (default) | float16 | float32: the dense weights' type"}),
    "compressed-tensors": Format("compressed_tensors", {
        "dtype": "float16 (default: our scales go in exactly) | bfloat16 | float32",
        "dense_fallback": "write modules the format cannot hold as dense tensors (ignored by its quantization) "
                          "instead of refusing",
        "symmetric": "write asymmetric grids in their exact symmetric form (codes minus zero points; refused "
                     "where a 4- or 8-bit code lies too far from its zero point) so plain from_pretrained loads "
                     "the folder"}),
    "gguf": Format("gguf_writer", {
        "gguf_type": "the GGML type (F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) of tensors no type holds exactly "
                     "(default: per tensor)",
        "force_type": "store every 2-D weight as --gguf-type, exact or not"},
        requires={"force_type": "gguf_type"}),
}


def flag(option: str) -> str:
    """The CLI spelling of a writer option: dense_fallback -> --dense-fallback."""
    return "--" + option.replace("_", "-")


def check_options(fmt: str, options: dict[str, Any]) -> None:
    """UserError for an unknown format or an option its writer does not take (it would be ignored)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    known = FORMATS[fmt].options
    stray = next((o for o in options if o not in known), None)
    if stray is not None:
        takes = ", ".join(flag(o) for o in known) or "none"
        raise UserError(f"{flag(stray)} does not apply to --format {fmt} (its options: {takes}); drop it")
    for option, needed in FORMATS[fmt].requires.items():
        if option in options and options.get(needed) is None:
            raise UserError(f"{flag(option)} needs {flag(needed)}; pass both")


def writer(fmt: str):
    """The `write` function of a format name, or a UserError listing the formats."""
    check_options(fmt, {})
    return importlib.import_module(f".{FORMATS[fmt].module}", __name__).write


def export(artifact_dir: str | Path, fmt: str, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Export a hypercompress artifact to `fmt` in `out_dir` (created; must not exist or be empty).

    `options`: the format's own (FORMATS[fmt].options). Returns the writer's report plus `format`
    and `out`. Raises UserError (one line) for an unknown format, an option it does not take, a missing or corrupt artifact, an existing non-empty `out_dir`, or a module kind the
    format cannot hold; in every error case nothing is left at `out_dir`.
    """
    from ..storage.artifact import load_verified
    from ..storage.atomic import atomic_directory, refuse_existing

    check_options(fmt, options)
    write = writer(fmt)
    out = refuse_existing(out_dir)  # before the (slow) load
    model, tokenizer, verified = load_verified(artifact_dir, fast=False)
    manifest = verified.manifest
    with atomic_directory(out) as tmp:
        report = write(model, tokenizer, manifest, tmp, **options)
    return {"format": fmt, "out": str(out), **report}
