"""hypercompress.evaluate: perplexity (KL / top-1 vs a teacher) on a text and lm-eval task accuracy,
each number with its protocol, for a loaded model or any model source."""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..arch import check_length
from ..sources.data import read_text, tokenize, windows
from ..errors import UserError, user_path
from ..sources.models import load_model
from ..storage.kept import EVALUATIONS, is_artifact_dir, keep_or_warn
from ..progress import Progress, Timeline, default_progress, library_bars_off
from .perplexity import evaluate_windows, protocol_text

Warn = Callable[[str], None]


@dataclass
class Evaluation:
    """What `evaluate` measured. Perplexity fields are None without a text, kl / top1 without a
    teacher, tasks / tasks_protocol without tasks. `to_dict()` is the CLI's --json."""

    model: str                    # the source, or "<ClassName> (in memory)"
    data: str | None              # the text's path / datasets spec, or "text (N characters)"
    teacher: str | None
    dtype: str                    # compute dtype, e.g. "float32"
    device: str
    ppl: float | None = None      # exp(mean NLL per predicted token)
    nll: float | None = None      # nats per predicted token
    kl: float | None = None       # KL(teacher || student), nats per predicted token
    top1: float | None = None     # share of positions where both argmaxes agree
    windows: int | None = None    # windows evaluated
    seq_len: int | None = None    # tokens per window
    tokens: int | None = None     # windows x seq_len
    predicted_tokens: int | None = None  # windows x (seq_len - 1)
    tokens_per_s: float | None = None    # student forward passes only
    protocol: str | None = None   # the perplexity protocol, one line
    backends: dict[str, int] | None = None  # kernel path -> compressed modules taking it
    tasks: dict[str, dict[str, Any]] | None = None  # task -> acc, acc_stderr, acc_norm, ..., docs
    tasks_protocol: str | None = None
    kept_in: str | None = None    # the artifact's evaluations.json it was kept in (keep=True)
    timeline: list[dict[str, Any]] | None = None  # [{"step", "seconds"}]: where the call's wall time went
    wall_seconds: float | None = None  # the call's wall time; the timeline's seconds add up to it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(model: nn.Module | str, text: str | None = None, *, data: str | os.PathLike[str] | None = None,
             tokenizer: Any = None, seq_len: int = 512, max_windows: int | None = None,
             teacher: nn.Module | str | None = None, batch_size: int = 4, dtype: torch.dtype | None = None,
             device: str | None = None, tasks: str | Sequence[str] | None = None,
             task_dir: str | os.PathLike[str] | None = None, num_fewshot: int | None = None,
             limit: int | None = None, trust_task_code: bool = False, progress: Progress | bool | None = True,
             keep: bool = False, warn: Warn | None = None) -> Evaluation:
    """Measure `model` on a text (perplexity, and KL / top-1 against `teacher`) and on lm-eval tasks.

    model: a loaded causal LM (nn.Module, e.g. from hypercompress.load; pass its `tokenizer`) or a
        model source for hypercompress.sources.models.load_model (artifact dir, smollm2-135m, .gguf, HF dir,
        hub id), loaded with `dtype` (default float32) on `device` (default cpu). A loaded model is
        evaluated where and as it is: `dtype` / `device`, if given, must match it.
    text: the evaluation text itself; or data: a text file path or a datasets spec NAME:CONFIG:SPLIT
        (as the CLI's --data). Not both. The text is tokenized once (no special tokens) into
        non-overlapping windows of `seq_len` tokens, the first `max_windows` kept, `batch_size`
        windows per forward pass (eval.perplexity holds the protocol).
    teacher: a loaded model or a source (same tokenizer as the student) for KL / top-1.
    tasks: lm-eval task names ('a,b' or a list) from `task_dir`, a folder of task YAMLs with local data
        (eval.harness); `num_fewshot` examples per context (None: the YAML's, else 0), the first
        `limit` docs per task (None: all). Scored through lm-eval's HFLM over the model in memory
        (a transformers PreTrainedModel, as load_model and hypercompress.load give). A task folder
        is code lm-eval would run: a task naming Python (`!function`) or including a YAML outside
        the folder is refused, and templates render in Jinja's sandbox, unless `trust_task_code`.
    progress: True (default): a bar per step on stderr (a notebook widget where ipywidgets is
        installed), False: nothing, or a function progress(section, done, total, note) called as
        models load and batches run (progress.py); the result's `timeline` lists the seconds of each
        step, adding up to `wall_seconds`.
    keep: also keep the result with the artifact `model` names (its evaluations.json, storage/kept.py;
        `inspect` and `plot` show it), replacing a kept one of the same protocol; `kept_in` says
        where. Nothing is kept unless asked. A folder that cannot be written is one `warn` (default:
        warnings.warn), not an error: the result is returned all the same.

    Returns an Evaluation. Raises UserError (one line, before any model loads where it can) for no
    text and no tasks, both text and data, a teacher without a text, a missing or empty text, tasks
    without task_dir (or the reverse), a bad task folder or task (eval.harness.load_tasks), a loaded
    model without tokenizer or on another dtype / device than asked, seq_len beyond the model's
    position limit or longer than the text, a model source that cannot load, and keep=True for a
    model that is not an artifact directory.
    """
    with library_bars_off(progress):
        timeline = Timeline("checking the options")
        progress = timeline.track(default_progress(progress))
        if keep and not is_artifact_dir(model):
            raise UserError(f"keep=True keeps the result in an artifact directory ({EVALUATIONS}); "
                            f"{_label(model)} is not one: pass keep=False")
        label, text = _text(text, data)
        if text is None and tasks is None and task_dir is None:
            raise UserError("nothing to measure: pass a text (--data) or tasks (--tasks with --task-dir)")
        if text is None and teacher is not None:
            raise UserError("a teacher is compared on the text's windows (KL, top-1); pass a text (--data) too")
        if num_fewshot is not None and num_fewshot < 0:
            raise UserError(f"--num-fewshot {num_fewshot} is negative; pass 0 or more")
        if limit is not None and limit < 1:
            raise UserError(f"--limit {limit} must be at least 1; pass 1 or more")
        task_list = _tasks(tasks, task_dir, trust_task_code)
        student, tokenizer, compute, where = _student(model, tokenizer, dtype, device, progress)
        result = Evaluation(model=_label(model), data=label, teacher=_label(teacher) if teacher is not None else None,
                            dtype=str(compute).removeprefix("torch."), device=where,
                            backends=dict(Counter(getattr(student, "hypercompress_backends", {}).values())))
        if text is not None:
            reference = _teacher(teacher, compute, where, progress, tokenizer, student)
            _perplexity(result, student, tokenizer, text, reference, seq_len, max_windows, batch_size, progress)
        if task_list is not None:
            from .harness import task_accuracy, tasks_protocol

            progress("lm-eval tasks", 0, 1)
            result.tasks = task_accuracy(student, tokenizer, task_list, num_fewshot, limit, batch_size, trust_task_code)
            result.tasks_protocol = tasks_protocol(result.tasks, str(task_dir), limit, batch_size, result.dtype, where)
            progress("lm-eval tasks", 1, 1)
        if keep:
            progress("keeping the result", 0, 1)
            kept = keep_or_warn(user_path(model), result, warn or functools.partial(warnings.warn, stacklevel=2))
            result.kept_in = str(kept) if kept else None
            progress("keeping the result", 1, 1)
        timeline.finish()
        result.timeline, result.wall_seconds = timeline.rows(), round(timeline.wall_seconds, 3)
        return result


def _text(text: str | None, data: str | os.PathLike[str] | None) -> tuple[str | None, str | None]:
    """(label, text) from exactly one of text / data, or (None, None)."""
    if isinstance(text, os.PathLike) or (isinstance(text, str) and "\n" not in text and len(text) < 4096
                                         and os.path.isfile(text)):
        raise UserError(f"text is a path ({text}); pass a file as data=, the text itself as text=")
    if text is not None and data is not None:
        raise UserError("pass the text itself (text=) or a file / datasets spec (data=), not both")
    if data is not None:
        return str(data), read_text(str(data))
    if text is not None:
        if not text.strip():
            raise UserError("the text holds nothing but whitespace; pass a non-empty text")
        return f"text ({len(text):,} characters)", text
    return None, None


def _tasks(tasks: str | Sequence[str] | None, task_dir: str | os.PathLike[str] | None,
           trust_code: bool = False) -> dict | None:
    """The loaded lm-eval tasks, or None; refuses tasks without a folder and a folder without tasks."""
    if tasks is None and task_dir is None:
        return None
    if task_dir is None:
        raise UserError("--tasks needs --task-dir, a folder of lm-eval task YAMLs with local data "
                        "(see README 'Task accuracy with lm-eval')")
    if tasks is None:
        raise UserError("--task-dir needs --tasks, the names of tasks in that folder to run")
    from .harness import load_tasks

    return load_tasks(task_dir, tasks, trust_code)


def _label(model: nn.Module | str) -> str:
    return model if isinstance(model, str) else f"{type(model).__name__} (in memory)"


def _student(model, tokenizer, dtype, device, progress) -> tuple[nn.Module, Any, torch.dtype, str]:
    """(model, tokenizer, compute dtype, device) loaded from a source, or checked when given."""
    if isinstance(model, str):
        progress(f"loading {model}", 0, 1)
        loaded = load_model(model, dtype=dtype or torch.float32, device=device or "cpu")
        progress(f"loading {model}", 1, 1)
        return loaded.model, tokenizer or loaded.tokenizer, dtype or torch.float32, device or "cpu"
    if not isinstance(model, nn.Module):
        raise UserError(f"model is a {type(model).__name__}; pass a loaded nn.Module or a model source string")
    if tokenizer is None:
        raise UserError("a loaded model needs its tokenizer: pass tokenizer= (hypercompress.load returns both)")
    tensor = next((p for p in model.parameters() if p.is_floating_point()), None)
    have_dtype = tensor.dtype if tensor is not None else torch.float32
    have_device = (tensor.device if tensor is not None else torch.device("cpu")).type
    if dtype is not None and dtype != have_dtype or device is not None and torch.device(device).type != have_device:
        raise UserError(f"the loaded model computes in {str(have_dtype).removeprefix('torch.')} on {have_device}; "
                        "pass dtype=None and device=None, or move the model first")
    return model, tokenizer, have_dtype, have_device


def _check_teacher(tokenizer, teacher_tokenizer, student: nn.Module, teacher: nn.Module) -> None:
    """UserError (before any window is scored) unless the teacher shares the student's tokenizer and
    scores as many vocabulary rows: KL and top-1 compare the two distributions id by id."""
    from ..training.teacher import check_shared_tokenizer

    rows = [int(m.config.vocab_size) for m in (student, teacher)]
    check_shared_tokenizer(tokenizer, teacher_tokenizer, min(rows))
    if rows[0] != rows[1]:
        raise UserError(f"the teacher scores {rows[1]:,} vocabulary rows and the model {rows[0]:,}; KL and top-1 "
                        "compare them id by id: pass a teacher with the same output size")


def _teacher(teacher, compute: torch.dtype, device: str, progress: Progress, tokenizer=None,
             student: nn.Module | None = None) -> nn.Module | None:
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    progress(f"loading teacher {teacher}", 0, 1)
    loaded = load_model(teacher, dtype=compute, device=device)
    reference = loaded.model
    progress(f"loading teacher {teacher}", 1, 1)
    _check_teacher(tokenizer, loaded.tokenizer, student, reference)
    return reference


def _perplexity(result: Evaluation, student: nn.Module, tokenizer: Any, text: str, reference: nn.Module | None,
                seq_len: int, max_windows: int | None, batch_size: int, progress: Progress) -> None:
    """Fill result's perplexity fields and protocol (eval.perplexity)."""
    for net in (student, reference):  # before any window is cut
        if net is not None and hasattr(net, "config"):
            check_length(net.config, seq_len, "--seq-len")
    progress("tokenizing the text", 0, 1)
    ids = tokenize(tokenizer, text)
    chunks = windows(ids, seq_len, max_windows)
    progress("tokenizing the text", 1, 1)
    section = "perplexity" + (" and KL vs the teacher" if reference is not None else "") + " (windows)"
    progress(section, 0, chunks.shape[0])
    numbers = evaluate_windows(student, chunks, batch_size, reference,
                               lambda done, total: progress(section, done, total))
    for key, value in numbers.items():
        setattr(result, key, value)
    result.protocol = protocol_text(result.data, seq_len, numbers["windows"], ids.numel() // seq_len,
                                    getattr(torch, result.dtype), result.teacher, result.device)
