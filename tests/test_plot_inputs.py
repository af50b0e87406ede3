"""hypercompress plot FOLDER scans every *.json under FOLDER (configs, manifests and other reports
among them): a file that cannot be read as JSON without risk (a FIFO, a link to a device) or a results
table / artifact summary with fields of the wrong type is skipped with a one-line warning naming it;
the plot is drawn from the rest, or the one-line 'no results' error when nothing is left."""

from __future__ import annotations

import json
import os

import pytest

from test_cli import run
from conftest import message_lines

GOOD = {"title": "good", "rows": [{"label": "a", "bits_per_weight": 4.0, "ppl": 30.0},
                                  {"label": "b", "bits_per_weight": 2.0, "ppl": 60.0}]}
SUMMARY = {"branches": [{"branch": "x", "bits_per_weight": 3.0, "ppl": 40.0}]}


pytestmark = pytest.mark.usefixtures("no_hang")  # a plot that blocks fails instead of hanging


def _fifo(path):
    os.mkfifo(path)


def _zero(path):
    os.symlink("/dev/zero", path)


def _text(content):
    return lambda path: path.write_text(content)


BAD = {
    "fifo": _fifo,
    "dev-zero-link": _zero,
    "label-int": _text(json.dumps({"rows": [{"label": 5, "bits_per_weight": 4.0, "ppl": 30.0}]})),
    "title-list": _text(json.dumps({"title": ["x"], "rows": [{"bits_per_weight": 4.0, "ppl": 30.0}]})),
    "row-not-object": _text(json.dumps({"rows": [1]})),
    "ppl-string": _text(json.dumps({"rows": [{"bits_per_weight": 4.0, "ppl": "30"}]})),
    "deep": _text("[" * 100_000),
    "not-utf8": lambda path: path.write_bytes(b"\xff\xfe{"),
}
BAD_SUMMARY = {
    "branches-int": {"branches": [1]},
    "branch-bpw-string": {"branches": [{"bits_per_weight": "3", "ppl": 40.0}]},
    "branch-no-bpw": {"branches": [{"ppl": 40.0}]},
}


def _bad_file(tmp_path, name):
    if name in BAD:
        file = tmp_path / "results" / f"{name}.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        BAD[name](file)
    else:
        file = tmp_path / "results" / name / "summary.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(BAD_SUMMARY[name]))
    return file


@pytest.mark.parametrize("name", [*BAD, *BAD_SUMMARY])
def test_a_bad_file_is_skipped_with_a_warning_and_the_rest_is_plotted(name, tmp_path):
    bad = _bad_file(tmp_path, name)
    (tmp_path / "results" / "good.json").write_text(json.dumps(GOOD))
    (tmp_path / "results" / "art").mkdir()
    (tmp_path / "results" / "art" / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "results" / "config.json").write_text(json.dumps({"hidden_size": 8}))  # not a result: silent
    result = run("plot", tmp_path / "results", "--out", tmp_path / "rd.png")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = message_lines(result.stderr)
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and str(bad) in warnings[0], result.stderr
    assert "skipped" in warnings[0]
    assert "3 points in 2 series" in result.stdout
    assert (tmp_path / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", [*BAD, *BAD_SUMMARY])
def test_a_folder_of_only_bad_files_is_the_one_line_no_results_error(name, tmp_path):
    _bad_file(tmp_path, name)
    result = run("plot", tmp_path / "results", "--out", tmp_path / "rd.png")
    assert result.exit_code == 2, result.output
    lines = message_lines(result.stderr)
    assert lines[-1].startswith("error: no results") and "1 malformed file skipped" in lines[-1], result.stderr
    assert len(lines) == 2 and lines[0].startswith("warning: ")
    assert not (tmp_path / "rd.png").exists()
