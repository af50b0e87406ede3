"""`hypercompress.analyze` and `hypercompress.edit`: from a model source and text files to a report.

    report = hypercompress.analyze("smollm2-135m", "valid.txt", out="report")
    result = hypercompress.edit("smollm2-135m", "concept.txt", "contrast.txt", unrelated="valid.txt", out="edited")

What `hypercompress analyze` and `hypercompress edit` run (the CLI parses, calls these and prints):
every option and file is checked first, then the model loads (float32, CPU), the texts become token
windows, and the measuring (report.analyze_windows) or the erasure (edit.erase_concept) runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import check_length
from ..errors import UserError
from ..parallel import check_device
from ..progress import Progress, default_progress, library_bars_off
from ..sources.data import calibration_windows, read_text, tokenize, windows
from ..sources.models import model_and_tokenizer
from ..storage.artifact import read_manifest
from ..storage.atomic import check_output_folder, refuse_existing
from ..storage.kept import is_artifact_dir
from .edit import check_method, checked_examples, erase_concept, example_lines
from .report import analyze_windows

TextOrPath = str | os.PathLike[str]


def analyze(model: nn.Module | str, calib: TextOrPath | torch.Tensor, *, out: str | Path | None = None,
            tokenizer: Any = None, calib_samples: int = 8, calib_len: int = 256, seed: int = 0,
            rd_layers: list[str] | None = None, sensitivity: bool = True, device: str = "cpu",
            progress: Progress | bool | None = True) -> dict:
    """Where `model`'s bits go: weight statistics, the planner's sensitivity and Fisher importance,
    per-layer rate-distortion against the Gaussian bound, information flow, symmetries, topology.

    model: a source (built-in name, .gguf, HF directory, hub id, artifact), loaded in float32 on the
        CPU, or a loaded nn.Module with its `tokenizer`.
    calib: a calibration text file (never the test text), from which `calib_samples` windows of
        `calib_len` tokens are drawn with `seed`; or (N, T) int64 token windows.
    out: a report folder to create (report.md, analysis.json, PNGs; written whole or not at all).
    rd_layers: linears measured against the bound (default: the first, middle and last blocks');
    sensitivity: the planner's per-module KL probe (minutes on a CPU for a 135M model);
    device: "cpu" or "cuda[:i]", where blocks compute. progress: as hypercompress.compress's.

    Returns report.analyze_windows's dict (protocol, weights, sensitivity, fisher, rate_distortion,
    flow, symmetry, topology, seconds). Raises UserError, before the model loads where it can, for
    an existing non-empty or unwritable `out`, an unknown device, a missing or binary text, a
    window length beyond the model's positions, a text shorter than one window, an unknown rd layer.
    """
    with library_bars_off(progress):
        say = default_progress(progress)
        _check_out(out)
        check_device(device)
        text = None if isinstance(calib, torch.Tensor) else read_text(str(calib))
        net, tokenizer = _model(model, tokenizer, say)
        samples = calibration_windows(calib if text is None else text, tokenizer, net.config, calib_samples,
                                      calib_len, seed)
        name = "calibration windows" if text is None else str(calib)
        return analyze_windows(net, samples, out, text_name=name, rd_layers=rd_layers, sensitivity=sensitivity,
                               device=device, progress=say)


def edit(model: nn.Module | str, concept: TextOrPath | Sequence[str], contrast: TextOrPath | Sequence[str], *,
         unrelated: TextOrPath | torch.Tensor, heldout: TextOrPath | torch.Tensor | None = None,
         tokenizer: Any = None, out: str | Path | None = None, method: str = "ablation", max_directions: int = 4,
         kl_budget: float = 0.05, max_tokens: int = 64, eval_windows: int = 8, eval_len: int = 256,
         heldout_share: float = 0.3, seed: int = 0, device: str = "cpu",
         progress: Progress | bool | None = True) -> dict:
    """Locate the concept that separates `concept` from `contrast` examples, erase it in the weights
    that write the residual stream, and validate the rest (analysis/edit.py holds the protocol).

    model: a source (loaded in float32 on the CPU, then moved to `device`), or a loaded nn.Module with
        its `tokenizer` (edited in place, moved to `device`).
    concept / contrast: a text file with one example per line, or a list of example lines.
    unrelated: text without the concept, a file cut into `eval_windows` windows of `eval_len` tokens
        or (N, T) token windows: KL(original || edited) on it is held within `kl_budget` nats/token.
    heldout: text the edit never sees, only measured on (same forms as `unrelated`).
    out: an artifact folder to write the edited model into, with edit.md / edit.json; a compressed
        source keeps its recipe and stored kinds.
    method: "ablation" (directional ablation of the difference of means) or "leace".
    max_directions erased at most; max_tokens kept per example; heldout_share of the examples held
    out of the fit; seed: the split. progress: as hypercompress.compress's.

    Returns the report (method, protocol, examples, chance, chance_bound, kl_budget, layers, steps,
    stopped, behaviour, unrelated, heldout, modules, seconds). Raises UserError, before the model
    loads where it can, for a bad `out`, method, device or budget, too few or identical examples,
    texts shorter than one window, lengths beyond the model's positions, an unsupported family,
    and nothing erased while `out` is given.
    """
    with library_bars_off(progress):
        say = default_progress(progress)
        _check_out(out)
        check_method(method)
        check_device(device)
        lines = {name: _example_lines(given, name) for name, given in (("concept", concept), ("contrast", contrast))}
        checked_examples(lines["concept"], lines["contrast"])  # before the model loads
        texts = {"unrelated": _text_or_windows(unrelated), "heldout": _text_or_windows(heldout)}
        net, tokenizer = _model(model, tokenizer, say)
        # a compressed source keeps its recipe (and, read from its folder, its lossless level)
        manifest = read_manifest(model) if is_artifact_dir(model) else getattr(net, "hypercompress_source", None)
        check_length(net.config, max(eval_len, max_tokens), "--eval-len/--max-tokens")
        chunks = {name: _windows(given, tokenizer, name, eval_len, eval_windows) for name, given in texts.items()}
        if device != "cpu":
            net.to(device)
        source = model if isinstance(model, str) else f"{type(model).__name__} (in memory)"
        return erase_concept(net, tokenizer, lines["concept"], lines["contrast"], unrelated=chunks["unrelated"],
                             heldout=chunks["heldout"], method=method, max_directions=max_directions,
                             kl_budget=kl_budget, max_tokens=max_tokens, heldout_share=heldout_share, seed=seed,
                             device=device, progress=say, out=out, source=source, source_manifest=manifest)


def _check_out(out: str | Path | None) -> None:
    if out is not None:
        refuse_existing(out)
        check_output_folder(out)  # refused now, not after minutes of work


def _model(model: nn.Module | str, tokenizer: Any, say: Progress) -> tuple[nn.Module, Any]:
    """The model and its tokenizer: a source loaded (float32, CPU), or a loaded one checked."""
    label = model if isinstance(model, str) else type(model).__name__
    say(f"loading {label}", 0, 1)
    net, tokenizer = model_and_tokenizer(model, tokenizer)
    if tokenizer is None:
        raise UserError("a loaded model needs its tokenizer: pass tokenizer= (hypercompress.load returns both)")
    say(f"loading {label}", 1, 1)
    return net, tokenizer


def _example_lines(given: TextOrPath | Sequence[str], name: str) -> list[str]:
    """A file's distinct non-empty lines, or the distinct non-empty strings of a list."""
    if isinstance(given, (str, os.PathLike)):
        return example_lines(read_text(str(given)), f"{name} file {given}")
    if not all(isinstance(line, str) for line in given):
        raise UserError(f"{name}: pass a text file path or a list of example strings")
    return example_lines("\n".join(given), f"the {name} list")


def _text_or_windows(given: TextOrPath | torch.Tensor | None) -> str | torch.Tensor | None:
    return given if given is None or isinstance(given, torch.Tensor) else read_text(str(given))


def _windows(given: str | torch.Tensor | None, tokenizer: Any, name: str, length: int,
             count: int) -> torch.Tensor | None:
    """(N, length) token windows of a text (the first `count`), or the windows given."""
    if given is None or isinstance(given, torch.Tensor):
        return given
    ids = tokenize(tokenizer, given)
    if ids.numel() < length:
        raise UserError(f"the --{name} text has {ids.numel()} tokens, fewer than one window of --eval-len {length}; "
                        "pass a longer text or a smaller --eval-len")
    return windows(ids, length, count)

