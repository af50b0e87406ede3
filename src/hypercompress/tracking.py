"""Experiment tracking: training scalars and the compress summary to TensorBoard and Weights & Biases.

Every trained method (distill, qat, hypernet, kan) writes, per optimizer step, under its own
prefix ("distill/loss", "qat/block_ap/loss", "hypernet/warm/loss", "kan/loss", ...):
    loss, kl, local, stability      the training loss and its terms (distill.py; nats per token
                                    for kl), or the phase's reconstruction loss (warm start, Block-AP, KAN)
    tokens_per_second               training throughput (KAN: matrix entries_per_second; it fits
                                    weights, not text, so it has no tokens and no KL)
    lr                              the learning rate of the optimizer's first parameter group at
                                    that step (lr_1, lr_2, ... for the others: scales, lr factors)
Destinations, from three keys each trained method's config has:
    log_dir         TensorBoard event files (torch.utils.tensorboard.SummaryWriter; package tensorboard)
    wandb_project   a Weights & Biases run in this project (package wandb); offline unless the
                    environment says otherwise (WANDB_MODE=online), so it never needs a network;
                    one run per trained stage (W&B steps only go forward within a run), named after
                    the prefix, grouped by WANDB_RUN_GROUP when set
    wandb_dir       where the W&B run files go (default: log_dir, else the working directory)
Only the main process of a launched run (parallel.py) writes.
`log_compress_summary` writes the compress summary (totals, bits per weight, the branches' size and
ppl / KL / top-1) to the same destinations at the end of a compress.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch

from . import parallel
from .errors import UserError

TRACKING_KEYS = ("log_dir", "wandb_project", "wandb_dir")
_PROJECT_FORBIDDEN = set("/\\#?%:")  # characters W&B refuses in a project name


def check_tracking(config: Any) -> None:
    """Raise a one-line UserError when a config's log_dir / wandb_project / wandb_dir cannot work:
    a missing package (naming its pip install), a W&B project name W&B refuses, a wandb_dir
    without a project. Called by each trained method's `validate`."""
    log_dir, project, wandb_dir = (getattr(config, key, None) for key in TRACKING_KEYS)
    for key, folder in (("log_dir", log_dir), ("wandb_dir", wandb_dir)):
        if folder is not None and not str(folder).strip():
            raise UserError(f"{key} is empty; pass a folder (e.g. runs/) or leave it unset")
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise UserError(f"{key} {folder} is a file, not a folder; pass a folder path (it is made if needed)")
    if log_dir is not None and importlib.util.find_spec("tensorboard") is None:
        raise UserError("log_dir needs the tensorboard package: pip install tensorboard (or leave log_dir unset)")
    if project is not None:
        if not project.strip() or _PROJECT_FORBIDDEN & set(project) or len(project) > 128:
            raise UserError(f"wandb_project={project!r}: a W&B project name is 1-128 characters without "
                            "/ \\ # ? % :; fix it in the recipe or --set")
        if importlib.util.find_spec("wandb") is None:
            raise UserError("wandb_project needs the wandb package: pip install wandb (or leave wandb_project unset)")
    if wandb_dir is not None and project is None:
        raise UserError("wandb_dir is set but wandb_project is not; set wandb_project=NAME to log to W&B, "
                        "or leave wandb_dir unset")


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{"lr": group 0's current learning rate, "lr_1": group 1's, ...} (the schedule's value now)."""
    return {("lr" if i == 0 else f"lr_{i}"): float(group["lr"]) for i, group in enumerate(optimizer.param_groups)}


def wandb_mode() -> str:
    """The W&B mode: WANDB_MODE when set (online, offline, disabled), else offline."""
    return os.environ.get("WANDB_MODE") or "offline"


def _wandb_run(project: str, wandb_dir: str | None, log_dir: str | None, name: str, config: dict | None):
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_project needs the wandb package: pip install wandb "
                        "(or leave wandb_project unset)") from None
    directory = Path(wandb_dir or log_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, dir=str(directory), name=name, job_type=name.split("/")[0],
                      config=config, mode=wandb_mode(), reinit="create_new")


class Tracker:
    """Scalars to TensorBoard and / or W&B under `prefix`; a no-op without destinations (and on
    every process but the main one). Use as a context manager, or call `close`.

    prefix: the tag prefix ("distill", "qat", "hypernet", "kan"); log_dir, wandb_project, wandb_dir:
    as in the module docstring; config: a dict recorded as the W&B run's config.
    Raises UserError when a destination's package is missing.
    """

    def __init__(self, prefix: str, log_dir: str | None = None, wandb_project: str | None = None,
                 wandb_dir: str | None = None, config: dict[str, Any] | None = None):
        self.prefix = prefix
        self.writer = self.run = None
        self._axes: set[str] = set()  # tags given their phase's W&B step metric
        if not parallel.is_main():
            return
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("log_dir needs the tensorboard package: pip install tensorboard "
                                "(or leave log_dir unset)") from None
            self.writer = SummaryWriter(log_dir)
        if wandb_project is not None:
            self.run = _wandb_run(wandb_project, wandb_dir, log_dir, prefix, config)

    @classmethod
    def of(cls, prefix: str, config: Any) -> "Tracker":
        """The tracker a method config asks for (its log_dir, wandb_project, wandb_dir; absent keys
        count as unset); the whole config is the W&B run's config."""
        values = {key: getattr(config, key, None) for key in TRACKING_KEYS}
        record = config.to_dict() if hasattr(config, "to_dict") else None
        return cls(prefix, **values, config=record)

    @property
    def active(self) -> bool:
        return self.writer is not None or self.run is not None

    def log(self, values: dict[str, float], step: int, prefix: str | None = None) -> None:
        """Write `values` (name -> number) at `step` as "<prefix>/<name>" (prefix: the tracker's by
        default, or a phase's, e.g. "qat/block_ap"). In W&B each prefix is plotted against its own
        "<prefix>/step" metric, so each phase counts its steps from 1."""
        if not self.active:
            return
        tags = {f"{prefix or self.prefix}/{key}": float(value) for key, value in values.items()}
        if self.writer is not None:
            for tag, value in tags.items():
                self.writer.add_scalar(tag, value, step)
        if self.run is not None:
            axis = f"{prefix or self.prefix}/step"  # each phase its own x-axis: steps may restart per phase
            for tag in tags.keys() - self._axes:
                self.run.define_metric(tag, step_metric=axis)
                self._axes.add(tag)
            self.run.log({**tags, axis: step})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
        self.writer = self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def destinations(stages: Iterable[Any]) -> list[dict[str, str | None]]:
    """The distinct (log_dir, wandb_project, wandb_dir) a recipe's stage configs name, in stage
    order; configs without any of the keys set are skipped. `stages`: configs or Recipe.stages
    (objects with a `.config`)."""
    found: list[dict[str, str | None]] = []
    for stage in stages:
        config = getattr(stage, "config", stage)
        entry = {key: getattr(config, key, None) for key in TRACKING_KEYS}
        if (entry["log_dir"] or entry["wandb_project"]) and entry not in found:
            found.append(entry)
    return found


def summary_scalars(summary: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(top-level finite numbers of the summary, e.g. bits_per_weight, safetensors_bytes,
    original_params, compress_seconds; the branch rows, each {"branch", "weights", "bytes",
    "bits_per_weight", "ratio_vs_16bit", "ppl", "kl", "top1"} as summary.branch_rows makes them)."""
    scalars = {key: float(value) for key, value in summary.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
    return scalars, [dict(row) for row in summary.get("branches") or []]


def log_compress_summary(summary: dict[str, Any], recipe: Any = None, *, log_dir: str | None = None,
                         wandb_project: str | None = None, wandb_dir: str | None = None) -> list[str]:
    """Log a compress summary to TensorBoard / W&B; returns the destinations written (paths, "wandb:PROJECT").

    summary: the compress summary dict (cli/compress.py's: top-level totals such as bits_per_weight,
    safetensors_bytes, original_params, compress_seconds, and "branches", a list of branch_rows).
    Destinations: the keyword arguments when log_dir or wandb_project is given, else every distinct
    destination the `recipe`'s stages name (tracking.destinations), else none (returns []).
    TensorBoard: "summary/<total>" at step 0, "summary/branches/<field>" at step = branch index
    (0 is the original) so bpw and ppl read as curves over the stages, and the branch table as text.
    W&B: a run named "summary" whose run summary holds the totals and whose "summary/branches"
    is a wandb.Table of the branch rows. Raises UserError when a destination's package is missing.
    """
    if log_dir is not None or wandb_project is not None:
        check_tracking(SimpleNamespace(log_dir=log_dir, wandb_project=wandb_project, wandb_dir=wandb_dir))
        targets = [{"log_dir": log_dir, "wandb_project": wandb_project, "wandb_dir": wandb_dir}]
    else:
        targets = destinations(getattr(recipe, "stages", recipe) or [])
    scalars, branches = summary_scalars(summary)
    written = []
    for target in targets:
        with Tracker("summary", **target, config={"recipe": summary.get("recipe"), "model": summary.get("model")}) as tracker:
            if not tracker.active:
                continue
            _summary_to_tracker(tracker, scalars, branches)
            written += [d for d in (target["log_dir"], target["wandb_project"] and f"wandb:{target['wandb_project']}") if d]
    return written


def _summary_to_tracker(tracker: Tracker, scalars: dict[str, float], branches: list[dict[str, Any]]) -> None:
    fields = [k for k in ("weights", "bytes", "bits_per_weight", "ratio_vs_16bit", "ppl", "kl", "top1")
              if any(isinstance(row.get(k), (int, float)) for row in branches)]
    if tracker.writer is not None:
        for key, value in scalars.items():
            tracker.writer.add_scalar(f"summary/{key}", value, 0)
        for index, row in enumerate(branches):
            for key in fields:
                if isinstance(row.get(key), (int, float)):
                    tracker.writer.add_scalar(f"summary/branches/{key}", float(row[key]), index)
        table = ["| branch | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
        table += [f"| {row.get('branch')} | " + " | ".join(_cell(row.get(k)) for k in fields) + " |" for row in branches]
        tracker.writer.add_text("summary/branches", "\n".join(table), 0)
    if tracker.run is not None:
        import wandb

        tracker.run.summary.update({f"summary/{key}": value for key, value in scalars.items()})
        columns = ["branch", *fields]
        tracker.run.log({"summary/branches": wandb.Table(columns=columns,
                                                         data=[[row.get(k) for k in columns] for row in branches])})


def _cell(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
