"""hypercompress edit MODEL_OR_ARTIFACT --concept POS.txt --contrast NEG.txt --unrelated TEXT --out DIR"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..storage.atomic import check_output_folder, refuse_existing
from ..errors import UserError
from ..sources.hub import check_hub_model
from .common import console, err_console, one_line_errors, section_progress
from .quiet import VERBOSE, quiet_libraries


def _windows(tokenizer, text: str, name: str, length: int, count: int):
    from ..sources.data import tokenize, windows

    ids = tokenize(tokenizer, text)
    if ids.numel() < length:
        raise UserError(f"the --{name} text has {ids.numel()} tokens, fewer than one window of --eval-len {length}; "
                        "pass a longer text or a smaller --eval-len")
    return windows(ids, length, count)


@one_line_errors
def edit(
    model: str = typer.Argument(..., help="smollm2-135m, a .gguf file, a HF model directory, a hub id or an artifact"),
    concept: str = typer.Option(..., "--concept", help="text file: one example of the concept per line"),
    contrast: str = typer.Option(..., "--contrast", help="text file: one example without the concept per line"),
    unrelated: str = typer.Option(..., "--unrelated", help="text without the concept: the KL budget is checked on it"),
    out: Path = typer.Option(..., "--out", help="artifact folder to create (the edited model and edit.md)"),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="text the edit never sees, only measured on"),
    method: str = typer.Option("ablation", "--method", help="ablation (directional ablation of the difference "
                               "of means) | leace (concept-erasure's LEACE, oblique: fragile when folded "
                               "into every layer)"),
    max_directions: int = typer.Option(4, "--max-directions", min=1, max=64, help="directions erased at most"),
    kl_budget: float = typer.Option(0.05, "--kl-budget", min=1e-9, help="KL(original || edited) allowed on the "
                                    "unrelated text, nats/token"),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="tokens kept per example line"),
    eval_windows: int = typer.Option(8, "--eval-windows", min=1, help="windows of the unrelated / heldout text"),
    eval_len: int = typer.Option(256, "--eval-len", min=2, help="tokens per window"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="seed of the fit / held-out split"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    verbose: bool = VERBOSE,
) -> None:
    """Locate a concept (per-layer probes), erase it in the weights, and validate the rest."""
    quiet_libraries(verbose)
    check_hub_model(model)  # offline or unreachable: one line now, before the library loads
    from ..analysis.edit import check_method, checked_examples, example_lines
    from ..analysis.edit import edit as run_edit
    from ..analysis.edit_report import summary_rows
    from ..arch import check_length
    from ..storage.artifact import read_manifest
    from ..sources.data import read_text
    from ..sources.models import load_model

    refuse_existing(out)
    check_output_folder(out)  # refused now, not after the edit
    check_method(method)
    texts = {"--concept": read_text(concept), "--contrast": read_text(contrast)}
    lines = {option: example_lines(text, option.removeprefix("--") + f" file {path}")
             for (option, text), path in zip(texts.items(), (concept, contrast))}
    checked_examples(lines["--concept"], lines["--contrast"])  # before the model loads
    other = {"unrelated": read_text(unrelated), "heldout": read_text(heldout) if heldout else None}
    with err_console.status(f"loading {model}"):
        loaded = load_model(model, device=None)
    check_length(loaded.model.config, max(eval_len, max_tokens), "--eval-len/--max-tokens")
    chunks = {name: _windows(loaded.tokenizer, text, name, eval_len, eval_windows) if text else None
              for name, text in other.items()}
    manifest = read_manifest(model) if loaded.kind == "artifact" else None
    if device != "cpu":
        loaded.model.to(device)
    with section_progress() as update:
        report = run_edit(loaded.model, loaded.tokenizer, lines["--concept"], lines["--contrast"],
                          unrelated=chunks["unrelated"], heldout=chunks["heldout"], method=method,
                          max_directions=max_directions, kl_budget=kl_budget, max_tokens=max_tokens, seed=seed,
                          device=device, progress=update, out=out, source=model, source_manifest=manifest)
    console.print(f"{out}: {len(report['steps'])} direction(s) erased ({report['method']}); {report['stopped']}")
    console.print(f"protocol: {report['protocol']}")
    width = max(len(m) for m, _, _ in summary_rows(report))
    for metric, before, after in summary_rows(report):
        console.print(f"  {metric:<{width}}  {before:>10} -> {after}")
    console.print(f"chance {report['chance']:.3f} (at chance: <= {report['chance_bound']:.3f}); "
                  f"per-layer table in {out}/edit.md")
