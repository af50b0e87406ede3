"""What a user sees: a hub id offline or out of reach is one line at once (no retries), the
libraries' logging, bars and warnings are off unless --verbose, no FutureWarning of ours, lm-eval's
git complaint is gone, and a long result line piped to a file stays one line.

The hub is never contacted: HF_ENDPOINT points at a closed local port, HF_HUB_OFFLINE is set, and
the Hugging Face cache is a folder made here.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from typer.testing import CliRunner

import hypercompress
from hypercompress.cli import app
from hypercompress.sources.hub import hub_unreachable, is_hub_id

from test_cli import assert_one_line_error, run

CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens there


QUIET_VARIABLES = ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


def cli(*args, **env: str) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter, stdout and stderr pipes (not terminals), `env` added
    (without the switches an in-process command of an earlier test left in os.environ)."""
    inherited = {k: v for k, v in os.environ.items() if k not in QUIET_VARIABLES}
    return subprocess.run([sys.executable, "-m", "hypercompress", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**inherited, **env})


def assert_fails_fast(done: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Retry" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def empty_cache(tmp_path):
    return {"HF_HUB_CACHE": str(tmp_path / "hub-cache")}


@pytest.fixture
def cached_tiny(model_dirs, tmp_path):
    """A Hugging Face cache holding tiny/llama (the tiny llama's files as its main revision)."""
    repo = tmp_path / "hub-cache" / "models--tiny--llama"
    shutil.copytree(model_dirs["llama"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return {"HF_HUB_CACHE": str(tmp_path / "hub-cache")}


def test_offline_and_not_cached_is_one_line_naming_the_fix(empty_cache, tmp_path):
    done = cli("compress", "org/name", "--method", "rtn", "--out", tmp_path / "x", HF_HUB_OFFLINE="1", **empty_cache)
    assert_fails_fast(done, "HF_HUB_OFFLINE is set", "org/name is not in the Hugging Face cache", "unset it")
    assert not (tmp_path / "x").exists()


def test_an_unreachable_hub_is_one_line_naming_the_fix(empty_cache, tmp_path):
    done = cli("compress", "org/name", "--method", "rtn", "--out", tmp_path / "x", HF_ENDPOINT=CLOSED_PORT,
               **empty_cache)
    assert_fails_fast(done, f"cannot reach {CLOSED_PORT} (", "to download org/name", "HF_HUB_OFFLINE=1")


def test_a_teacher_from_the_hub_takes_the_same_path(empty_cache, model_dirs, text_file):
    done = cli("evaluate", model_dirs["llama"], "--data", text_file, "--teacher", "org/teacher",
               HF_HUB_OFFLINE="1", **empty_cache)
    assert_fails_fast(done, "org/teacher is not in the Hugging Face cache")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": CLOSED_PORT}], ids=["offline", "unreachable"])
def test_a_cached_hub_model_loads_from_the_cache(cached_tiny, env):
    code = "from hypercompress.sources.models import load_model; print(load_model('tiny/llama').kind)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **cached_tiny, **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "hub" and "Retry" not in done.stderr


def test_reachability_is_one_quick_try():
    reason = hub_unreachable(CLOSED_PORT, timeout=3.0)
    assert reason and "\n" not in reason


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "model").mkdir()
    assert is_hub_id("org/name") and is_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert not any(is_hub_id(s) for s in ("local/model", "./org/name", "/org/name", "org/name.gguf",
                                          "smollm2-135m", "a/b/c"))


def test_quiet_by_default_verbose_shows_the_libraries(model_dirs, tmp_path):
    """The tiny GPT-2's config makes transformers warn on load and shows its loading bar: only
    with --verbose."""
    quiet = cli("compress", model_dirs["gpt2"], "--method", "rtn", "--out", tmp_path / "quiet")
    loud = cli("compress", model_dirs["gpt2"], "--method", "rtn", "--out", tmp_path / "loud", "--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "[transformers]" in loud.stderr and "it/s" in loud.stderr
    assert "[transformers]" not in quiet.stderr and "it/s" not in quiet.stderr
    assert "Warning" not in quiet.stderr


@pytest.mark.parametrize("command", ["compress", "evaluate", "export", "analyze", "edit"])
def test_every_command_that_loads_a_model_has_verbose(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--verbose" in result.output


def test_a_compress_records_no_future_warning(model_dirs, calib_file, text_file, tmp_path):
    """Whichever module a FutureWarning is attributed to (transformers' own deprecations point at
    the caller's caller): a compress with calibration, the KV-cache measurement and evaluation
    raises none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hypercompress.compress(str(model_dirs["llama"]), method="gptq", calib=str(calib_file), calib_samples=4,
                               calib_len=64, eval_text=str(text_file), eval_windows=2, out=tmp_path / "gptq")
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert not future


def _deprecated_api() -> None:
    warnings.warn("going away", FutureWarning, stacklevel=2)  # attributed to the caller


def test_pytest_turns_our_deprecations_into_errors():
    """pyproject's filterwarnings: a FutureWarning or DeprecationWarning whose stacklevel points
    into hypercompress fails the test; another package's is ignored."""
    ours = {"__name__": "hypercompress.some_module", "deprecated_api": _deprecated_api}
    with pytest.raises(FutureWarning, match="going away"):
        exec("deprecated_api()", ours)
    with pytest.raises(DeprecationWarning):
        exec("import warnings; warnings.warn('old', DeprecationWarning)", dict(ours))
    exec("deprecated_api()", {"__name__": "somebody_else", "deprecated_api": _deprecated_api})


def test_a_long_result_line_stays_one_line_when_piped(model_dirs, tmp_path):
    result = run("compress", model_dirs["llama"], "--method", "rtn", "--out", tmp_path / "art")
    assert result.exit_code == 0, result.output
    footer = [line for line in result.stdout.splitlines() if line.startswith("original params")]
    assert len(footer) == 1 and len(footer[0]) > 160, result.stdout
    assert footer[0].rstrip().endswith("(cpu)")
    assert "┃ branch" in result.stdout  # the table still drawn


def test_a_bad_dtype_is_still_one_line(model_dirs, text_file):
    assert_one_line_error(run("evaluate", model_dirs["llama"], "--data", text_file, "--dtype", "int3"),
                          "--dtype int3", "float32")


def test_quiet_hides_other_packages_warnings_not_ours(monkeypatch):
    from hypercompress.cli.quiet import quiet_libraries

    for variable in QUIET_VARIABLES:
        monkeypatch.delenv(variable, raising=False)  # restored afterwards
    monkeypatch.setattr(sys, "warnoptions", [])
    lm_eval_logger = logging.getLogger("lm_eval")
    monkeypatch.setattr(lm_eval_logger, "level", lm_eval_logger.level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries(verbose=False)
        for module in ("transformers.modeling_utils", "hypercompressor", "hypercompress.workflow"):
            exec(f"import warnings; warnings.warn({module!r}, UserWarning)", {"__name__": module})
    assert [str(w.message) for w in caught] == ["hypercompress.workflow"]
    assert os.environ["TQDM_DISABLE"] == "1" and lm_eval_logger.level == logging.ERROR
