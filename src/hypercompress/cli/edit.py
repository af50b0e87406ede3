"""hypercompress edit MODEL_OR_ARTIFACT --concept POS.txt --contrast NEG.txt --unrelated TEXT --out DIR"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..storage.atomic import check_output_folder, refuse_existing
from ..sources.hub import check_hub_model
from ..sources.text_source import check_text_source
from .common import console, one_line_errors, section_progress
from .quiet import VERBOSE, quiet_libraries


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
    refuse_existing(out)
    check_output_folder(out)  # refused now, before torch loads
    for option, text in (("--concept", concept), ("--contrast", contrast), ("--unrelated", unrelated),
                         ("--heldout", heldout)):
        if text is not None:
            check_text_source(text, option)
    check_hub_model(model)  # offline or unreachable: one line now, before the library loads
    from ..analysis.edit_report import summary_rows
    from ..analysis.public import edit as run_edit

    with section_progress() as update:
        report = run_edit(model, concept, contrast, unrelated=unrelated, heldout=heldout, out=out, method=method,
                          max_directions=max_directions, kl_budget=kl_budget, max_tokens=max_tokens,
                          eval_windows=eval_windows, eval_len=eval_len, seed=seed, device=device, progress=update)
    console.print(f"{out}: {len(report['steps'])} direction(s) erased ({report['method']}); {report['stopped']}")
    console.print(f"protocol: {report['protocol']}")
    width = max(len(m) for m, _, _ in summary_rows(report))
    for metric, before, after in summary_rows(report):
        console.print(f"  {metric:<{width}}  {before:>10} -> {after}")
    console.print(f"chance {report['chance']:.3f} (at chance: <= {report['chance_bound']:.3f}); "
                  f"per-layer table in {out}/edit.md")
