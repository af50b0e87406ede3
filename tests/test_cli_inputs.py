"""Every number and output path the CLI takes is checked before any work: one line, exit code 2."""

from __future__ import annotations

import pytest

from hypercompress import workflow
from hypercompress.eval import evaluation

from test_cli import assert_one_line_error, run


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: a refused input must be refused before it."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(workflow, "load_model", fail)
    monkeypatch.setattr(evaluation, "load_model", fail)


@pytest.mark.parametrize("option, value", [
    ("--calib-samples", 0), ("--calib-samples", -2), ("--calib-len", 0), ("--calib-len", 1),
    ("--calib-len", -5), ("--calib-batch", 0), ("--eval-windows", 0), ("--distill-steps", 0), ("--lossless", -1),
    ("--lossless", 23), ("--seed", -1),
])
def test_compress_numbers_out_of_range(option, value, model_dirs, calib_file, tmp_path, no_loading):
    result = run("compress", model_dirs["llama"], "--method", "gptq", "--calib", calib_file,
                 option, value, "--out", tmp_path / "out")
    assert_one_line_error(result, option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", [
    ("--seq-len", 1), ("--seq-len", 0), ("--max-windows", 0), ("--batch-size", 0), ("--batch-size", -1),
])
def test_evaluate_numbers_out_of_range(option, value, model_dirs, text_file, no_loading):
    assert_one_line_error(run("evaluate", model_dirs["llama"], "--data", text_file, option, value), option)


def test_missing_option_is_one_line(model_dirs):
    assert_one_line_error(run("compress", model_dirs["llama"], "--method", "rtn"), "--out")


def test_outputs_under_a_file_are_refused_before_loading(model_dirs, text_file, tmp_path, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = model_dirs["llama"]
    cases = [
        (["compress", model, "--method", "rtn", "--out", blocker / "art"], ["--out", "a-file"]),
        (["compress", model, "--method", "rtn", "--out", tmp_path / "art", "--json", blocker / "r.json"],
         ["--json", "a-file"]),
        (["evaluate", model, "--data", text_file, "--json", blocker / "r.json"], ["--json", "a-file"]),
        (["evaluate", model, "--data", text_file, "--json", tmp_path], ["--json", "is a folder"]),
        (["export", tmp_path / "no-artifact", "--format", "hf", "--out", blocker / "x"], ["--out", "a-file"]),
        (["plot", tmp_path, "--out", blocker / "rd.png"], ["--out", "a-file"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run(*args), *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], args


def test_lengths_beyond_the_position_limit_are_refused(model_dirs, calib_file, text_file, tmp_path):
    """The tiny models hold 256 positions; a longer window is refused before calibration."""
    for arch in ("llama", "gpt2"):
        result = run("compress", model_dirs[arch], "--method", "gptq", "--calib", calib_file,
                     "--calib-len", 100000, "--out", tmp_path / "out")
        assert_one_line_error(result, "--calib-len 100000", "position limit of 256")
        assert list(tmp_path.iterdir()) == []
        result = run("evaluate", model_dirs[arch], "--data", text_file, "--seq-len", 257)
        assert_one_line_error(result, "--seq-len 257", "position limit of 256")


def test_compress_eval_windows_fit_the_model(model_dirs, calib_file, text_file, tmp_path):
    """--eval's 512-token windows are cut to the model's 256 positions instead of crashing."""
    result = run("compress", model_dirs["gpt2"], "--method", "rtn", "--eval", text_file,
                 "--eval-windows", 1, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "windows of 256 tokens" in result.output
