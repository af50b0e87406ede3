"""hypercompress evaluate MODEL_OR_ARTIFACT --data PATH [--teacher MODEL] [--json FILE]"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..arch import check_length
from ..data import read_text, tokenize, windows
from ..eval import evaluate_windows, protocol_text
from ..models import load_model
from ..atomic import check_output_file
from .common import (console, err_console, one_line_errors, parse_dtype, progress_bar,
                     write_json)


@one_line_errors
def evaluate(
    model: str = typer.Argument(..., help="an artifact directory or any model source"),
    data: str = typer.Option(..., "--data", help="evaluation text file (or NAME:CONFIG:SPLIT)"),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="use the first N windows"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="reference model for KL / top-1"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="windows per forward pass"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where the model runs (an "
                               "artifact's compressed layers take that device's kernels)"),
) -> None:
    """Perplexity (and KL / top-1 vs a teacher) on non-overlapping windows of a text."""
    compute = parse_dtype(dtype)
    check_output_file(json_path)
    text = read_text(data)
    with err_console.status(f"loading {model}"):
        student = load_model(model, dtype=compute, device=device)
    with err_console.status(f"loading teacher {teacher}"):
        reference = load_model(teacher, dtype=compute, device=device).model if teacher else None
    for net in (student.model, reference):  # before any window is cut
        if net is not None:
            check_length(net.config, seq_len, "--seq-len")
    with err_console.status("tokenizing"):
        ids = tokenize(student.tokenizer, text)
    chunks = windows(ids, seq_len, max_windows)
    with progress_bar("evaluating") as update:
        result = evaluate_windows(student.model, chunks, batch_size, reference, update)
    available = ids.numel() // seq_len
    result.update({
        "model": model, "data": data, "teacher": teacher, "dtype": dtype,
        "protocol": protocol_text(data, seq_len, result["windows"], available, compute, teacher, device),
        "backends": _backend_counts(student.model),
    })
    line = f"ppl {result['ppl']:.4f}"
    if teacher:
        line += f" | KL {result['kl']:.4f} nats/token | top-1 {result['top1']:.4f}"
    console.print(f"{line} | {result['tokens_per_s']:.0f} tokens/s")
    console.print(f"protocol: {result['protocol']}")
    for backend, count in result["backends"].items():
        console.print(f"kernels: {count} modules {backend}")
    write_json(json_path, result)


def _backend_counts(model) -> dict[str, int]:
    """How many compressed modules took each kernel path (hypercompress.kernels)."""
    from collections import Counter

    return dict(Counter(getattr(model, "hypercompress_backends", {}).values()))
