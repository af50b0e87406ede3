"""hypercompress export ARTIFACT --format compressed-tensors|gguf|hf --out DIR"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..storage.atomic import check_output_file, check_output_folder, refuse_existing
from .common import console, one_line_errors, section_progress, write_json
from .quiet import VERBOSE, quiet_libraries


@one_line_errors
def export(
    artifact: str = typer.Argument(..., help="an artifact directory written by 'hypercompress compress'"),
    fmt: str = typer.Option(..., "--format", help="compressed-tensors (vLLM, transformers) | gguf "
                            "(llama.cpp) | hf (dense safetensors any tool loads)"),
    out: Path = typer.Option(..., "--out", help="new directory to write"),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="gguf: the GGML type for "
                                            "tensors no exact type holds (default: per tensor)"),
    force_type: bool = typer.Option(False, "--force-type", help="gguf: store every 2-D weight as "
                                    "--gguf-type, exact or not"),
    dense_fallback: bool = typer.Option(False, "--dense-fallback", help="compressed-tensors: write "
                                        "modules the format cannot hold as dense tensors (ignored by "
                                        "its quantization) instead of refusing"),
    symmetric: bool = typer.Option(False, "--symmetric", help="compressed-tensors: write asymmetric grids "
                                   "in their exact symmetric form (codes minus zero points; refused where a "
                                   "4- or 8-bit code lies too far from its zero point) so plain from_pretrained "
                                   "loads the folder"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="hf: bfloat16 (default) | float16 | float32; "
                                        "compressed-tensors: float16 (default) | bfloat16 | float32"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the export report as JSON"),
    verbose: bool = VERBOSE,
) -> None:
    """Write the artifact in another runtime's format (atomically; refuses an existing --out)."""
    quiet_libraries(verbose)
    from ..exporters import check_options, export as run_export

    given = {"gguf_type": gguf_type, "force_type": force_type, "dense_fallback": dense_fallback,
             "symmetric": symmetric, "dtype": dtype}
    options = {name: value for name, value in given.items() if value not in (None, False)}
    check_options(fmt, options)
    refuse_existing(out)
    check_output_folder(out)
    check_output_file(json_path)
    with section_progress() as update:  # one step; a line every few seconds while it runs (a log too)
        update(f"exporting {artifact} as {fmt}", 0, 1)
        report = run_export(artifact, fmt, out, **options)
        update(f"exporting {artifact} as {fmt}", 1, 1)
    size = report.get("safetensors_bytes") or report.get("bytes")
    console.print(f"wrote {report['out']} ({fmt}{f', {size:,} bytes' if size else ''})")
    for line in (report.get("summary"), *report.get("notes", [])):
        if line:
            console.print(line)
    write_json(json_path, report)
