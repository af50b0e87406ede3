"""Task accuracy through lm-eval (EleutherAI's lm-evaluation-harness), offline, over an in-memory model.

The user gives a folder of lm-eval task YAMLs whose data are local files (`dataset_path: json` with
`dataset_kwargs: {data_files: ...}`, or csv / parquet / text / arrow, or a local dataset folder);
paths in a YAML are relative to that YAML's folder. `load_tasks` indexes the folder with lm-eval's
TaskManager (the built-in task catalogue left out, so a name means the folder's task, never the
hub's), refuses a task whose data is not local before anything loads, then builds each task with
the Hugging Face hub switched off. `task_accuracy` runs lm-eval's `simple_evaluate` through its HFLM
wrapper around the model as it is in memory (an artifact's compressed modules, no re-save).

A task folder is third-party input that lm-eval would run as code: a `!function module.name` tag
imports a Python file, an `include:` may reach a YAML (and its Python) outside the folder, and
templates render in a plain Jinja environment where `{{ lipsum.__globals__ ... }}` reaches `os`.
Unless the caller passes `trust_code` (`--trust-task-code`), `load_tasks` refuses the first two
before anything is imported (`check_task_code`), and templates render in Jinja's sandbox
(`sandboxed_templates`: attribute access to Python internals is a SecurityError, one line).

Metrics are lm-eval's: for a multiple-choice doc with choices c_i, acc = 1 when the gold choice has
the highest log-likelihood sum_t log p(c_i,t | context, c_i,<t), acc_norm the same after dividing
each by len(c_i) in characters; a task's value is the mean over its docs, stderr the sample standard
deviation / sqrt(docs).
"""

from __future__ import annotations

import glob
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from ..errors import UserError, user_path

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders that read local files
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_HOW = ("give the task local data files (dataset_path: json with dataset_kwargs: {data_files: ...}, "
        "see README 'Task accuracy with lm-eval')")


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError("task accuracy needs the package lm-eval; install it with: pip install lm-eval") from None
    return lm_eval


def task_names(tasks: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (blanks dropped, repeats once); none left is a UserError."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise UserError("--tasks is empty; pass task names, e.g. --tasks arc_easy,hellaswag")
    return names


def load_tasks(task_dir: str | os.PathLike[str], tasks: str | Sequence[str],
               trust_code: bool = False) -> dict[str, Any]:
    """{name: lm-eval Task with its docs loaded} for the named tasks of `task_dir`, in the given order.

    Raises UserError when the folder is missing, a name is not a task there (the folder's tasks are
    listed), a task's data is not local (it would read the hub) or a listed file is missing, a task
    would run code and `trust_code` is off (check_task_code), or lm-eval cannot build the task (bad
    YAML, template or data file; its first line is quoted)."""
    names = task_names(tasks)
    folder = user_path(task_dir).absolute()  # a task loads from inside its own folder (chdir)
    if not folder.is_dir():
        raise UserError(f"task folder not found: {task_dir}; pass --task-dir, a folder of lm-eval task YAMLs "
                        "with local data (see README 'Task accuracy with lm-eval')")
    _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    index = manager.task_index  # name -> entry (its parsed YAML, functions unresolved, and the YAML's path)
    known = sorted(manager.all_subtasks)
    for name in names:
        entry = index.get(name)
        if name not in known or entry.yaml_path is None:
            what = "a group or tag, not a task" if entry is not None else "not a task"
            raise UserError(f"--tasks {name}: {what} in {task_dir}; the folder's tasks: {', '.join(known) or 'none'} "
                            "(a YAML lm-eval cannot parse is skipped)")
        check_local_data(name, entry.cfg or {}, Path(entry.yaml_path).parent)
        if not trust_code:
            check_task_code(name, Path(entry.yaml_path), folder)
    built = {}
    for name in names:
        built[name] = _build(manager, name, Path(index[name].yaml_path).parent, trust_code)
    return built


MAX_TASK_YAML_BYTES = 4 << 20  # a task YAML is a few kB
TRUST_HINT = "pass --trust-task-code (Python: trust_task_code=True) only for a folder you trust"


def check_task_code(name: str, yaml_path: Path, folder: Path) -> None:
    """UserError when task `name`'s YAML, or one it includes, names Python to run (`!function`) or
    includes a YAML outside `folder`. Reads each YAML (bounded) with a safe loader that records the
    tags instead of importing anything."""
    import yaml

    functions: list[str] = []  # the !function tags of the file being read

    class Recorder(yaml.SafeLoader):
        pass

    Recorder.add_constructor("!function", lambda loader, node: functions.append(str(loader.construct_scalar(node))))
    root, pending, seen = folder.resolve(), [yaml_path], set()
    while pending:
        path = pending.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        if root not in path.parents:
            raise UserError(f"task {name} includes {path}, outside --task-dir {folder}; {TRUST_HINT}")
        if not path.is_file() or path.stat().st_size > MAX_TASK_YAML_BYTES:
            raise UserError(f"task {name}: {path} is missing, not a file or over {MAX_TASK_YAML_BYTES:,} bytes; "
                            "check the task folder")
        functions.clear()
        try:
            config = yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=Recorder)  # noqa: S506
        except yaml.YAMLError as exc:
            raise UserError(f"task {name}: {path.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if functions:
            raise UserError(f"task {name} runs Python from its folder (!function {functions[0]} in "
                            f"{path.name}), which lm-eval would import; {TRUST_HINT}")
        includes = config.get("include") if isinstance(config, dict) else None
        for include in includes if isinstance(includes, list) else [includes] if includes else []:
            pending.append(path.parent / str(include))


@contextmanager
def sandboxed_templates(trust_code: bool = False) -> Iterator[None]:
    """lm-eval's template environment swapped for Jinja's immutable sandbox (same settings and
    filters) meanwhile, unless `trust_code`: a template reaching Python internals raises
    jinja2's SecurityError instead of running; restored afterwards."""
    if trust_code:
        yield
        return
    import lm_eval.utils as utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    original = utils.env
    sandbox = ImmutableSandboxedEnvironment(loader=original.loader, undefined=original.undefined,
                                            keep_trailing_newline=original.keep_trailing_newline)
    sandbox.filters.update(original.filters)
    utils.env = sandbox
    try:
        yield
    finally:
        utils.env = original


def check_local_data(name: str, config: dict[str, Any], base: Path) -> None:
    """UserError unless task `name`'s data (its YAML `config`, paths relative to `base`) are local
    files that exist: nothing may come from the hub or a URL."""
    if "custom_dataset" in config or "class" in config:
        raise UserError(f"task {name} builds its data in Python (custom_dataset / class); {_HOW}")
    path = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    if path in LOCAL_BUILDERS:
        patterns = _patterns(kwargs.get("data_files"))
        if kwargs.get("data_dir") is not None:
            patterns.append(str(kwargs["data_dir"]))
        if not patterns:
            raise UserError(f"task {name}: dataset_path {path} without dataset_kwargs.data_files; "
                            "list its local data files there")
        for pattern in patterns:
            if "://" in pattern:
                raise UserError(f"task {name}: data file {pattern} is a URL; {_HOW}")
            if not glob.glob(str(base / pattern)):
                raise UserError(f"task {name}: data file {pattern} not found (paths are relative to {base}); "
                                "pass an existing file")
        return
    if path and "://" not in str(path) and (base / str(path)).is_dir():
        return
    raise UserError(f"task {name} reads its data from the Hugging Face hub (dataset_path: {path}), "
                    f"which evaluation never touches; {_HOW}")


def _patterns(files: Any) -> list[str]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [str(files)]
    if isinstance(files, dict):
        return [p for value in files.values() for p in _patterns(value)]
    return [str(f) for f in files]


def _build(manager: Any, name: str, base: Path, trust_code: bool = False) -> Any:
    """The task built by lm-eval with its data loaded, relative paths read from `base`, hub off,
    templates sandboxed unless `trust_code`."""
    try:
        with _working_folder(base), offline(), _quiet_datasets(), sandboxed_templates(trust_code):
            return manager.load([name])["tasks"][name]
    except UserError:
        raise
    except Exception as exc:
        while exc.__cause__ is not None or exc.__context__ is not None:  # the root cause names the problem
            exc = exc.__cause__ or exc.__context__
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if type(exc).__name__ == "SecurityError":  # jinja2.sandbox stopped a template
            raise UserError(f"task {name}: a template reaches Python ({first}), which the sandbox stops; "
                            f"{TRUST_HINT}") from None
        raise UserError(f"task {name}: lm-eval could not load it ({type(exc).__name__}: {first}); "
                        "check its YAML and data files") from None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets' progress bars and error logs off while a task's data loads (a failure becomes one
    UserError line); restored afterwards."""
    import datasets

    bars_off, level = datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_off:
            datasets.utils.enable_progress_bars()


@contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """datasets resolves relative data_files from the working folder: a task's YAML folder meanwhile
    (the process's working folder, so not for threads that rely on theirs)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face hub switched off for datasets and huggingface_hub (both read their flag when
    imported, so the flags are set on the loaded modules too); restored afterwards."""
    import datasets
    import huggingface_hub.constants as hub

    saved_env = {key: os.environ.get(key) for key in _OFFLINE_VARIABLES}
    saved = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update({key: "1" for key in _OFFLINE_VARIABLES})
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_GIT_COMPLAINT = re.compile(rb"fatal: not a git repository[^\n]*\n?")


@contextmanager
def _without_git_complaint() -> Iterator[None]:
    """lm-eval's simple_evaluate records the working folder's git commit with `git describe`, whose
    stderr is the process's: outside a git repository git prints 'fatal: not a git repository ...'
    (lm-eval 0.4.13 has no switch for it). Meanwhile file descriptor 2 is a pipe whose reader passes
    everything else on as it comes (bars and logs still flow); restored afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(target=_pass_on, args=(read_end, saved), daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the reader reads to its end
        reader.join(timeout=5)
        if not reader.is_alive():  # (a child process still holding the pipe keeps it open)
            os.close(saved)


def _pass_on(read_end: int, target: int) -> None:
    """Copy the pipe to `target` until it closes, without git's complaint (one write of one line)."""
    with open(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            chunk = _GIT_COMPLAINT.sub(b"", chunk)
            while chunk:
                chunk = chunk[os.write(target, chunk):]


def task_accuracy(model: nn.Module, tokenizer: Any, tasks: dict[str, Any], num_fewshot: int | None = None,
                  limit: int | None = None, batch_size: int = 4, trust_code: bool = False) -> dict[str, dict[str, Any]]:
    """{task: {metric: value, metric_stderr: value, ..., num_fewshot, docs, docs_available}} from
    lm-eval's simple_evaluate over HFLM(model) (tasks from `load_tasks`; metrics in [0, 1]).

    num_fewshot: examples in each context (None: the YAML's, else 0); limit: the first N docs of each
    task (None: all); templates render sandboxed unless `trust_code`. A template the sandbox stops
    is a UserError naming the task folder's code."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..kernels.decode import dynamic_decode

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    nothing_more = TaskManager(include_defaults=False)  # the tasks are built: no catalogue to index (14k YAMLs)
    from jinja2.exceptions import SecurityError

    try:
        with offline(), _without_git_complaint(), sandboxed_templates(trust_code), dynamic_decode(model):
            out = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks.values()), num_fewshot=num_fewshot,
                                          limit=limit, log_samples=False, task_manager=nothing_more)
    except SecurityError as exc:
        raise UserError(f"a task template reaches Python ({str(exc).splitlines()[0][:200]}), which the sandbox "
                        f"stops; {TRUST_HINT}") from None
    results = {}
    for name in tasks:
        metrics = {}
        for key, value in out["results"][name].items():
            metric, _, kept = key.partition(",")
            if kept:  # "acc,none": metric acc after the filter "none"
                label = metric if kept == "none" else f"{metric},{kept}"
                metrics[label] = float(value) if isinstance(value, (int, float)) else None
        samples = out["n-samples"][name]
        results[name] = {**metrics, "num_fewshot": int(out["n-shot"][name]), "docs": int(samples["effective"]),
                         "docs_available": int(samples["original"])}
    return results


def tasks_protocol(results: dict[str, dict[str, Any]], task_dir: str, limit: int | None, batch_size: int,
                   dtype: str, device: str) -> str:
    """The one-line protocol printed next to the task table."""
    version = lm_eval_version()
    parts = [f"{name} {r['num_fewshot']}-shot, {r['docs']} of {r['docs_available']} docs"
             for name, r in results.items()]
    limited = f"first {limit} docs per task" if limit else "all docs"
    metrics = {m for r in results.values() for m in r}
    defined = ("acc = share of docs whose gold choice has the highest log-likelihood; " if "acc" in metrics else "") + \
              ("acc_norm = the same per character of each choice; " if "acc_norm" in metrics else "")
    return (f"lm-eval {version} simple_evaluate over HFLM(the in-memory model), tasks from {task_dir}: "
            f"{'; '.join(parts)} ({limited}); {defined}stderr = sample std / sqrt(docs); "
            f"batch {batch_size}, {dtype} compute on {device}, hub offline")


def lm_eval_version() -> str:
    """The installed lm-eval's version (its distribution's metadata)."""
    import importlib.metadata

    return importlib.metadata.version("lm_eval")
