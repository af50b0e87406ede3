"""`erase_concept(model, tokenizer, concept, contrast, unrelated=...)`: locate a concept, erase it from
the residual stream (folded into the weights), and prove what that did (hypercompress.edit,
analysis/public.py, reads the files and loads the model first).

Protocol (printed with every number):
1. The concept's and the contrast's lines (one example each, at most `max_tokens` tokens) are split,
   per class and seeded, into a fit split and a held-out split (`heldout_share`). Lines found in both
   files are dropped from both.
2. Locate: pooled residual features per layer (probes.py); per layer the held-out accuracy of a probe
   trained on the fit split, and the classes' separation (Cohen's d along the difference of means).
3. Erase, one direction at a time (at most `max_directions`): at every layer whose probe beats
   chance (majority share + 2 standard errors) in 3-fold cross-validation on the fit split (the
   held-out split is never used to choose), fit the erasure on the fit split's token-level residuals
   (erasure.py: LEACE or directional ablation; the massive-activation channels,
   probes.massive_channels, left out); fold the one whose trial KL(original || edited) on the first
   unrelated window is smallest (the least collateral damage) into every residual writer, check KL on
   all unrelated windows against `kl_budget` (over it: undone, stop), re-measure. Stop too when every
   layer's cross-validated probe is at chance.
4. Validate on what the artifact stores (dense tensors rounded to float16 first): held-out probe
   accuracy per layer before/after (a fresh probe trained on the edited model's features), behaviour
   (edit_metrics.py) on held-out lines, perplexity / KL / top-1 on the unrelated windows and on the
   `heldout` windows (text the edit never saw).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..arch import blocks_of, residual_writer_names
from ..storage.atomic import refuse_existing
from ..errors import UserError
from ..eval.perplexity import evaluate_windows, teacher_log_probs
from .edit_report import save_edited
from .edit_metrics import behaviour, distinctive_tokens
from .erasure import METHODS, erasure_fitter, erasure_from, fold_erasure, refresh_fast_path
from .probes import chance_bound, massive_channels, cross_validated_accuracy, pooled_residuals, probe_accuracy, separation

MIN_EXAMPLES = 8  # per file, after empty, repeated and shared lines are dropped
Progress = Callable[[str, int, int], None]


def example_lines(text: str, name: str) -> list[str]:
    """The distinct non-empty lines of `text` (stripped), in order. Raises UserError when none."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not lines:
        raise UserError(f"{name} holds no example lines; write one example per line")
    return lines


def _split(count: int, share: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(count))
    rng.shuffle(order)
    held = max(2, math.ceil(share * count))
    return sorted(order[held:]), sorted(order[:held])


def checked_examples(concept: list[str], contrast: list[str]) -> tuple[list[str], list[str], int]:
    """(concept, contrast, shared): the lines with those found in both files dropped. Raises UserError
    for identical files or fewer than MIN_EXAMPLES lines left on a side (checked before any work)."""
    if set(concept) == set(contrast):
        raise UserError("the concept and contrast files hold the same lines; the contrast must be text "
                        "without the concept (e.g. the same sentences with the concept removed)")
    shared = set(concept) & set(contrast)
    concept = [line for line in concept if line not in shared]
    contrast = [line for line in contrast if line not in shared]
    for side, lines in (("concept", concept), ("contrast", contrast)):
        if len(lines) < MIN_EXAMPLES:
            raise UserError(f"the {side} file has {len(lines)} usable lines (distinct, non-empty, not in both "
                            f"files); pass at least {MIN_EXAMPLES}, one example per line")
    return concept, contrast, len(shared)


def _layer_label(index: int, blocks: int) -> str:
    return "embedding" if index == 0 else ("final norm" if index == blocks else f"after block {index - 1}")


@dataclass
class _Examples:
    """The tokenized lines, their labels (1 concept, 0 contrast) and the seeded fit / held-out split."""

    lines: list[torch.Tensor]
    labels: torch.Tensor
    fit: torch.Tensor      # indices into lines
    held: torch.Tensor
    s_concept: list[int]   # distinctive tokens (edit_metrics.distinctive_tokens) of the fit split
    s_contrast: list[int]
    counts: dict

    def held_lines(self, label: int) -> list[torch.Tensor]:
        return [self.lines[i] for i in self.held.tolist() if int(self.labels[i]) == label]


def _examples(tokenizer, concept: list[str], contrast: list[str], max_tokens: int, share: float,
              seed: int) -> _Examples:
    concept, contrast, shared = checked_examples(concept, contrast)
    encode = lambda line: torch.tensor(tokenizer(line, add_special_tokens=False)["input_ids"][:max_tokens],  # noqa: E731
                                       dtype=torch.long)
    encoded = {1: [encode(line) for line in concept], 0: [encode(line) for line in contrast]}
    lines, labels_list = [], []
    for label, side in ((1, "concept"), (0, "contrast")):
        usable = [ids for ids in encoded[label] if ids.numel() >= 2]  # the first token is never pooled
        if len(usable) < MIN_EXAMPLES:
            raise UserError(f"the {side} file has {len(usable)} lines of 2 tokens or more; pass at least "
                            f"{MIN_EXAMPLES}, one example per line")
        lines += usable
        labels_list += [label] * len(usable)
    labels = torch.tensor(labels_list)
    rng, fit, held = random.Random(seed), [], []
    for label in (1, 0):
        members = [i for i in range(len(lines)) if int(labels[i]) == label]
        f, h = _split(len(members), share, rng)
        fit += [members[i] for i in f]
        held += [members[i] for i in h]
    s_concept, s_contrast = distinctive_tokens([lines[i] for i in fit if labels[i] == 1],
                                               [lines[i] for i in fit if labels[i] == 0])
    counts = {"concept": len(concept), "contrast": len(contrast), "shared_dropped": shared,
              "fit": len(fit), "heldout": len(held), "max_tokens": max_tokens, "seed": seed}
    return _Examples(lines, labels, torch.tensor(fit), torch.tensor(held), s_concept, s_contrast, counts)


def _features(model: nn.Module, ex: _Examples, method: str, device: str, massive: list[int]):
    """(pooled features (layers + 1, N, hidden), one erasure fitter per block input fed with the
    fit split's token-level residuals: what each layer's erasure is fitted on). The `massive`
    channels are zeroed in what the fitters see, so no erasure reads or moves them."""
    fit_rows, fitters = set(ex.fit.tolist()), []
    massive_t = torch.tensor(massive, dtype=torch.long)

    def observe(states, mask, rows):
        keep = torch.tensor([r in fit_rows for r in rows], device=mask.device)
        if not bool(keep.any()):
            return
        token_mask = mask[keep]
        labels = ex.labels[torch.tensor(rows)[keep.cpu()]].to(mask.device)
        z = labels[:, None].expand(token_mask.shape)[token_mask].double().cpu()[:, None]
        if not fitters:
            fitters.extend(erasure_fitter(states.shape[-1], method) for _ in range(states.shape[0] - 1))
        for layer, fitter in enumerate(fitters):
            x = states[layer][keep][token_mask].double().cpu()
            x[:, massive_t] = 0.0
            fitter.update(x, z)

    return pooled_residuals(model, ex.lines, device, observe=observe), fitters


def _probe_rows(features: torch.Tensor, ex: _Examples, when: str) -> list[dict]:
    """Per layer: held-out probe accuracy and separation, keys suffixed `when` (before / after)."""
    return [{f"probe_{when}": probe_accuracy(x[ex.fit], ex.labels[ex.fit], x[ex.held], ex.labels[ex.held]),
             f"separation_{when}": separation(x[ex.fit], ex.labels[ex.fit])} for x in features]


def _quality(model: nn.Module, windows: dict[str, torch.Tensor | None], teachers: dict, device: str) -> dict:
    """{name: evaluate_windows result against the original's log-probs} per named window set (None stays None)."""
    return {name: None if chunk is None else evaluate_windows(model, chunk.to(device), teacher=teachers[name])
            for name, chunk in windows.items()}


def _quality_of_teacher(log_probs: list[torch.Tensor], chunk: torch.Tensor) -> dict:
    """Perplexity of the original from its cached log-probabilities (teacher_log_probs batches of
    `chunk` (N, T)), as evaluate_windows computes it, without another forward pass."""
    targets = chunk[:, 1:]
    nll = -sum(float(lp.gather(-1, targets[i:i + lp.shape[0], :, None].to(lp.device)).double().sum())
               for i, lp in zip(range(0, chunk.shape[0], log_probs[0].shape[0]), log_probs))
    nll /= targets.numel()
    return {"ppl": math.exp(nll), "nll": nll, "kl": 0.0, "top1": 1.0, "windows": int(chunk.shape[0]),
            "seq_len": int(chunk.shape[1]), "tokens": int(chunk.numel()), "predicted_tokens": int(targets.numel())}


def erase_concept(model: nn.Module, tokenizer, concept: list[str], contrast: list[str], *,
                  unrelated: torch.Tensor, heldout: torch.Tensor | None = None, method: str = "ablation",
                  max_directions: int = 4, kl_budget: float = 0.05, max_tokens: int = 64,
                  heldout_share: float = 0.3, seed: int = 0, device: str = "cpu", progress: Progress | None = None,
                  out: str | Path | None = None, source: str = "model", source_manifest: dict | None = None) -> dict:
    """Erase the concept that separates `concept` lines from `contrast` lines from `model`, in place.

    concept / contrast: example lines (one example each; example_lines reads a file's text).
    unrelated / heldout: (N, T) token-id windows of text without the concept (the budget is checked
    on `unrelated`; `heldout` is only measured). With `out`, the edited model is written there as an
    artifact holding the report (edit_report.save_edited; `source_manifest`: the manifest of a source
    artifact, whose recipe and sizes carry over).
    Returns the report (module docstring): method, protocol, examples, chance, chance_bound,
    kl_budget, layers, steps, stopped, behaviour, unrelated, heldout, modules, seconds.
    Raises UserError for too few or identical examples, nothing erased while `out` is given, an unknown method, a writer kind the edit
    cannot keep, an unsupported architecture, or bad windows."""
    _check_arguments(method, max_directions, kl_budget, heldout_share, unrelated, heldout)
    if out is not None:
        refuse_existing(out)  # before minutes of work
    tick = time.perf_counter()
    say = progress or (lambda *_: None)
    residual_writer_names(model)  # an unsupported architecture fails before any work
    ex = _examples(tokenizer, concept, contrast, max_tokens, heldout_share, seed)
    blocks = len(blocks_of(model))
    windows = {"unrelated": unrelated, "heldout": heldout}

    say("measuring the original", 0, 1)
    teachers = {name: None if chunk is None else teacher_log_probs(model, chunk.to(device))
                for name, chunk in windows.items()}
    quality_before = {name: None if chunk is None else _quality_of_teacher(teachers[name], chunk)
                      for name, chunk in windows.items()}
    massive = massive_channels(model, unrelated[:1], device=device)
    features, fitters = _features(model, ex, method, device, massive)
    layers = [{"layer": i, "label": _layer_label(i, blocks), **row}
              for i, row in enumerate(_probe_rows(features, ex, "before"))]
    behaviour_before = behaviour(model, ex.held_lines(1), ex.held_lines(0), ex.s_concept, ex.s_contrast, device)
    say("measuring the original", 1, 1)

    steps, stopped, modules = _erase(model, ex, features, fitters, method, max_directions, kl_budget,
                                     unrelated.to(device), teachers["unrelated"], seed, device, say, massive)
    if out is not None and not steps:  # the artifact would be the source model again
        raise UserError(f"nothing was erased, so no artifact was written: {stopped}; raise --kl-budget, or "
                        "give a contrast that differs from the concept only in the concept")

    from ..storage.artifact import round_to_storage

    round_to_storage(model)  # measure what the artifact will hold
    say("validating", 0, 1)
    for layer, row in zip(layers, _probe_rows(pooled_residuals(model, ex.lines, device), ex, "after")):
        layer.update(row)
    quality_after = _quality(model, windows, teachers, device)
    behaviour_after = behaviour(model, ex.held_lines(1), ex.held_lines(0), ex.s_concept, ex.s_contrast, device)
    say("validating", 1, 1)
    chance, bound = chance_bound(ex.labels[ex.held])
    decode = lambda ids: [tokenizer.decode([t]) for t in ids[:24]]  # noqa: E731
    report = {
        "method": method,
        "protocol": (f"{ex.counts['fit']} fit / {ex.counts['heldout']} held-out lines (at most {max_tokens} tokens, "
                     f"mean-pooled residuals), float32 on {device}; unrelated and heldout text: {unrelated.shape[0]} "
                     f"windows of {unrelated.shape[1]} tokens; the edited model measured as stored (dense tensors "
                     "rounded to float16)"),
        "examples": ex.counts, "chance": chance, "chance_bound": bound, "kl_budget": kl_budget,
        "layers": layers, "steps": steps, "stopped": stopped,
        "behaviour": {"before": behaviour_before, "after": behaviour_after,
                      "tokens": {"concept": decode(ex.s_concept), "contrast": decode(ex.s_contrast),
                                 "concept_count": len(ex.s_concept), "contrast_count": len(ex.s_contrast)}},
        **{name: None if quality_before[name] is None else
           {"before": quality_before[name], "after": quality_after[name]} for name in windows},
        "modules": _module_summary(modules), "massive_channels": massive,
        "seconds": round(time.perf_counter() - tick, 1),
    }
    if out is not None:
        save_edited(model, tokenizer, out, report, source=source, source_manifest=source_manifest)
    return report


def check_method(method: str) -> None:
    """UserError for an erasure method that is not one of METHODS."""
    if method not in METHODS:
        raise UserError(f"--method {method}: one of {', '.join(METHODS)}")


def _check_arguments(method, max_directions, kl_budget, heldout_share, unrelated, heldout) -> None:
    check_method(method)
    if max_directions < 1 or not kl_budget > 0 or not 0 < heldout_share < 1:
        raise UserError("max_directions must be >= 1, kl_budget > 0 and heldout_share in (0, 1)")
    for name, chunk in (("unrelated", unrelated), ("heldout", heldout)):
        if chunk is not None and (chunk.dim() != 2 or chunk.shape[0] < 1 or chunk.shape[1] < 2):
            raise UserError(f"{name} windows of shape {tuple(chunk.shape)}: need (windows >= 1, tokens >= 2)")


def _trial_kl(model, erasure, windows, teacher) -> float:
    """KL(original || model with `erasure` folded) on `windows`, the model left as it was."""
    saved = _writer_state(model)
    fold_erasure(model, erasure)
    kl = evaluate_windows(model, windows, teacher=teacher)["kl"]
    _restore_writers(model, saved)
    return kl


def _erase(model, ex: _Examples, features, fitters, method, max_directions, kl_budget, unrelated, teacher, seed,
           device, say, massive):
    """Step 3 of the protocol: (steps, stopped, fold rows of the last kept direction)."""
    blocks = features.shape[0] - 1  # the final normed state is probed, never erased at (it is not the stream)
    bound = chance_bound(ex.labels[ex.fit])[1]
    trial_windows, trial_teacher = unrelated[:1], [teacher[0][:1]]
    steps, stopped, modules = [], f"reached the most directions allowed ({max_directions})", []
    for step in range(max_directions):
        say("erasing", step, max_directions)
        scores = [cross_validated_accuracy(features[i][ex.fit], ex.labels[ex.fit], seed=seed) for i in range(blocks)]
        candidates = [i for i in range(blocks) if scores[i] > bound]
        if not candidates:
            stopped = f"every layer's probe at chance (cross-validated accuracy <= {bound:.3f})"
            break
        erasures = {i: erasure_from(fitters[i], method) for i in candidates}
        trial = {i: _trial_kl(model, erasures[i], trial_windows, trial_teacher) for i in candidates}
        layer = min(candidates, key=lambda i: trial[i])  # the least collateral damage
        saved = _writer_state(model)
        rows = fold_erasure(model, erasures[layer])
        kl = evaluate_windows(model, unrelated, teacher=teacher)["kl"]
        if kl > kl_budget:
            _restore_writers(model, saved)
            stopped = (f"direction {step + 1} (the least damaging, fitted at {_layer_label(layer, blocks)}) would take "
                       f"KL on the unrelated text to {kl:.4f} > budget {kl_budget}: undone")
            break
        modules = rows
        steps.append({"direction": step + 1, "layer": layer, "label": _layer_label(layer, blocks),
                      "cv_accuracy": scores[layer], "separation": separation(features[layer][ex.fit], ex.labels[ex.fit]),
                      "unrelated_kl": kl, "candidates": len(candidates)})
        features, fitters = _features(model, ex, method, device, massive)
    say("erasing", max_directions, max_directions)
    return steps, stopped, modules


def _writer_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    embeddings, writers = residual_writer_names(model)
    return {name: {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}
            for name in embeddings + writers}


def _restore_writers(model: nn.Module, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, state in saved.items():
        module = model.get_submodule(name)
        module.load_state_dict(state)
        refresh_fast_path(module)


def _module_summary(rows: list[dict]) -> list[dict]:
    """Edited modules grouped by how they were edited: {"how", "modules", "kinds", "max_left"}."""
    groups: dict[str, dict] = {}
    for row in rows:
        group = groups.setdefault(row["how"], {"how": row["how"], "modules": 0, "kinds": set(), "max_left": 0.0})
        group["modules"] += 1
        group["kinds"].add(row["kind"])
        group["max_left"] = max(group["max_left"], row["left"])
    return [{**g, "kinds": sorted(g["kinds"])} for g in groups.values()]
