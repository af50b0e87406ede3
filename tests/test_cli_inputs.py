"""Every number and output path the CLI takes is checked before any work: one line, exit code 2."""

from __future__ import annotations

import pytest

from hypercompress.sources import models
from hypercompress.eval import evaluation

from test_cli import assert_one_line_error, run


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: a refused input must be refused before it."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(evaluation, "load_model", fail)
    monkeypatch.setattr(models, "load_model", fail)  # compress, analyze and edit load through it


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


@pytest.mark.parametrize("place", ["under a file", "under a link to nowhere"])
def test_every_output_option_is_refused_before_loading(place, model_dirs, text_file, tmp_path, no_loading):
    """Each command's every output option, pointed at a place nothing can be created in."""
    if place == "under a file":
        blocker, needle = tmp_path / "a-file", "a-file"
        blocker.write_text("not a folder")
    else:
        blocker, needle = tmp_path / "gone", "link to a missing place"
        blocker.symlink_to(tmp_path / "missing-folder")
    model, left = model_dirs["llama"], sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["compress", model, "--method", "rtn", "--out", blocker / "art"], "--out"),
        (["compress", model, "--method", "rtn", "--out", tmp_path / "art", "--json", blocker / "r.json"], "--json"),
        (["evaluate", model, "--data", text_file, "--json", blocker / "r.json"], "--json"),
        (["export", tmp_path / "no-artifact", "--format", "hf", "--out", blocker / "x"], "--out"),
        (["export", tmp_path / "no-artifact", "--format", "hf", "--out", tmp_path / "x", "--json", blocker / "r.json"],
         "--json"),
        (["inspect", tmp_path / "no-artifact", "--json", blocker / "r.json"], "--json"),
        (["analyze", model, "--calib", text_file, "--out", blocker / "report"], "--out"),
        (["edit", model, "--concept", text_file, "--contrast", text_file, "--unrelated", text_file,
          "--out", blocker / "edited"], "--out"),
        (["plot", tmp_path, "--out", blocker / "rd.png"], "--out"),
    ]
    for args, option in cases:
        assert_one_line_error(run(*args), option, needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == left, args


def test_a_json_path_that_is_a_folder_is_refused(model_dirs, text_file, tmp_path, no_loading):
    assert_one_line_error(run("evaluate", model_dirs["llama"], "--data", text_file, "--json", tmp_path),
                          "--json", "is a folder")
    assert_one_line_error(run("inspect", tmp_path / "no-artifact", "--json", tmp_path), "--json", "is a folder")


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
