"""hypercompress evaluate MODEL_OR_ARTIFACT [--data PATH] [--teacher MODEL] [--tasks A,B --task-dir DIR] [--json FILE]
[--no-keep]: an artifact keeps its result (evaluations.json, storage/kept.py) for inspect and plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..storage.atomic import check_output_file
from ..sources.hub import check_hub_model
from ..sources.text_source import check_text_source
from .clock import STARTED
from .common import console, one_line_errors, parse_dtype, section_progress, write_json
from .progress import print_time_table, process_seconds
from .quiet import VERBOSE, quiet_libraries

if TYPE_CHECKING:
    from ..eval.evaluation import Evaluation


@one_line_errors
def evaluate(
    model: str = typer.Argument(..., help="an artifact directory or any model source"),
    data: Optional[str] = typer.Option(None, "--data", help="evaluation text file (or NAME:CONFIG:SPLIT) "
                                       "for perplexity"),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="use the first N windows"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="reference model for KL / top-1"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="windows (or lm-eval requests) per forward pass"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks from --task-dir, comma-separated "
                                        "(e.g. arc_easy,hellaswag)"),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="folder of lm-eval task YAMLs whose data are "
                                            "local files (README: Task accuracy with lm-eval)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="examples per context "
                                              "(default: the task YAML's, else 0)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="the first N docs of each task"),
    trust_task_code: bool = typer.Option(False, "--trust-task-code", help="let --task-dir run its code: "
                                         "!function modules, includes outside the folder, unsandboxed "
                                         "templates (only for a folder you trust)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where the model runs (an "
                               "artifact's compressed layers take that device's kernels)"),
    keep: bool = typer.Option(True, "--keep/--no-keep", help="keep the result with an artifact (its "
                              "evaluations.json, replacing one of the same protocol): inspect and plot show it"),
    verbose: bool = VERBOSE,
) -> None:
    """Perplexity (and KL / top-1 vs a teacher) on non-overlapping windows of a text; task accuracy
    through lm-eval on local task data. An artifact keeps the result (--no-keep: not)."""
    quiet_libraries(verbose)
    if data is not None:
        check_text_source(data, "--data")  # a missing file answers now, before torch loads
    check_hub_model(model)  # offline or unreachable: one line now, before the library loads
    if teacher:
        check_hub_model(teacher)
    from ..eval.evaluation import evaluate as evaluate_model
    from ..storage.kept import is_artifact_dir

    compute = parse_dtype(dtype)
    check_output_file(json_path)
    started = process_seconds(STARTED)  # the start-up: interpreter, imports, option checks
    with section_progress() as update:
        result = evaluate_model(model, data=data, seq_len=seq_len, max_windows=max_windows, teacher=teacher,
                                batch_size=batch_size, dtype=compute, device=device, tasks=tasks,
                                task_dir=task_dir, num_fewshot=num_fewshot, limit=limit,
                                trust_task_code=trust_task_code, progress=update,
                                keep=keep and is_artifact_dir(model), warn=_warn)
    _print(result)
    if result.kept_in:
        console.print(f"kept in {result.kept_in} (inspect and plot show it; --no-keep skips this)")
    print_time_table(console, result.timeline, started)
    write_json(json_path, result.to_dict())


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _print(result: Evaluation) -> None:
    if result.ppl is not None:
        line = f"ppl {result.ppl:.4f}"
        if result.teacher:
            line += f" | KL {result.kl:.4f} nats/token | top-1 {result.top1:.4f}"
        console.print(f"{line} | {result.tokens_per_s:.0f} tokens/s")
        console.print(f"protocol: {result.protocol}")
    if result.tasks is not None:
        console.print(f"{'task':<24} {'n-shot':>6} {'docs':>6} {'acc':>16} {'acc_norm':>16}")
        for name, row in result.tasks.items():
            console.print(f"{name:<24} {row['num_fewshot']:>6} {row['docs']:>6} {_metric(row, 'acc'):>16} "
                          f"{_metric(row, 'acc_norm'):>16}")
        console.print(f"tasks protocol: {result.tasks_protocol}")
    for backend, count in result.backends.items():
        console.print(f"kernels: {count} modules {backend}")


def _metric(row: dict, name: str) -> str:
    """'0.4500 ± 0.0500', or '-' for a metric the task does not report."""
    if row.get(name) is None:
        return "-"
    stderr = row.get(f"{name}_stderr")
    return f"{row[name]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
