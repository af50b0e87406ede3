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
import os
import shutil
import tempfile
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
    from ..artifact import load, read_manifest

    write = writer(fmt)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; pass a new --out path")
    manifest = read_manifest(artifact_dir)
    model, tokenizer = load(artifact_dir, fast=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out.parent} ({exc.strerror}); pass a writable --out path") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        report = write(model, tokenizer, manifest, tmp, **options)
        _make_readable(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": fmt, "out": str(out), **report}


def _make_readable(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~umask)
