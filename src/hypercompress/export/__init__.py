"""Writers for other runtimes' formats: a hypercompress artifact -> a directory another tool loads.

| format | writer | who loads it |
|---|---|---|
| `hf` | export/hf.py | any tool: dense safetensors + config + tokenizer (transformers, vLLM, llama.cpp's converter) |
| `compressed-tensors` | export/compressed_tensors.py | transformers (with the `compressed-tensors` package) and vLLM |
| `gguf` | export/gguf_writer.py | llama.cpp (and transformers' GGUF loader) |

Each writer is `write(model, tokenizer, manifest, out_dir, **options) -> dict` (a report: what was
stored how, and any measured re-quantization cost), given the artifact as `artifact.load` returns it
(CPU, float32) and an empty temporary directory; it raises UserError naming the module kind and the
format that can hold it when the format cannot hold one. `export()` below does the rest: refuses an
existing --out, writes into a temporary directory beside it and renames it into place, so nothing is
ever half-written.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import UserError

FORMATS = {
    "hf": "hf",
    "compressed-tensors": "compressed_tensors",
    "gguf": "gguf_writer",
}


def writer(fmt: str):
    """The `write` function of a format name, or a UserError listing the formats."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(f".{FORMATS[fmt]}", __name__).write


def export(artifact_dir: str | Path, fmt: str, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Export a hypercompress artifact to `fmt` in `out_dir` (created; must not exist or be empty).

    Returns the writer's report plus `format` and `out`. Raises UserError (one line) for an unknown
    format, a missing or corrupt artifact, an existing non-empty `out_dir`, or a module kind the
    format cannot hold; in every error case nothing is left at `out_dir`.
    """
    from ..artifact import load_verified
    from ..atomic import atomic_directory, refuse_existing

    write = writer(fmt)
    out = refuse_existing(out_dir)  # before the (slow) load
    model, tokenizer, verified = load_verified(artifact_dir, fast=False)
    manifest = verified.manifest
    with atomic_directory(out) as tmp:
        report = write(model, tokenizer, manifest, tmp, **options)
    return {"format": fmt, "out": str(out), **report}
