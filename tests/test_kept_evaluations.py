"""`hypercompress evaluate ARTIFACT` keeps its result with the artifact (evaluations.json, unlisted
and unhashed): `inspect` shows it and `plot` draws it. Since nothing vouches for that file, one that
is corrupt, oversized or hostile is one warning and ignored by inspect and plot (and never read by
load); a folder that cannot be written is a warning, and the evaluation still prints."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import hypercompress
from hypercompress.storage import artifact
from hypercompress.storage.inspection import inspect as inspect_artifact
from hypercompress.errors import UserError
from hypercompress.storage import kept

from test_cli import run
from conftest import message_lines

pytestmark = pytest.mark.usefixtures("no_hang")  # a reader that blocks fails instead of hanging
EVALUATE = ("--seq-len", 32, "--max-windows", 2)


@pytest.fixture(scope="module")
def sealed(model_dirs, tmp_path_factory):
    """A tiny 3-bit RTN artifact, never evaluated (tests copy it)."""
    out = tmp_path_factory.mktemp("kept") / "llama-rtn"
    result = run("compress", model_dirs["llama"], "--method", "rtn", "--set", "bits=3", "--set", "group_size=32",
                 "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def art(sealed, tmp_path):
    return shutil.copytree(sealed, tmp_path / "runs" / "rtn3")


def evaluate(art, text_file, *extra):
    result = run("evaluate", art, "--data", text_file, *EVALUATE, *extra)
    assert result.exit_code == 0, result.output
    return result


def kept_rows(art):
    return json.loads((art / kept.EVALUATIONS).read_text())["evaluations"]


def warnings_of(result):
    return message_lines(result.stderr)


def test_evaluate_keeps_the_result_and_inspect_shows_it(art, text_file, tmp_path):
    result = evaluate(art, text_file)
    assert f"kept in {art / kept.EVALUATIONS}" in result.stdout
    [row] = kept_rows(art)
    assert row["ppl"] > 1 and row["windows"] == 2 and row["seq_len"] == 32 and row["data"] == str(text_file)
    assert row["protocol"].startswith(str(text_file)) and row["date"] and row["hypercompress_version"]
    artifact.load(art)  # the unlisted file does not unseal the artifact
    shown = run("inspect", art, "--json", tmp_path / "i.json")
    assert shown.exit_code == 0 and not warnings_of(shown), shown.output
    assert f"ppl {row['ppl']:.4f}" in shown.stdout and "protocol: " + row["protocol"][:40] in shown.stdout
    assert shown.stdout.index("bits per weight") < shown.stdout.index("per module")  # the whole model first
    summary = json.loads((tmp_path / "i.json").read_text())
    assert summary["evaluations"] == [row]


def test_an_evaluation_of_the_same_protocol_replaces_the_older(art, text_file, model_dirs):
    evaluate(art, text_file)
    first = kept_rows(art)
    evaluate(art, text_file)
    again = kept_rows(art)
    assert len(again) == 1 and again[0]["protocol"] == first[0]["protocol"]
    evaluate(art, text_file, "--teacher", model_dirs["llama"])  # another protocol: kept beside it
    rows = kept_rows(art)
    assert len(rows) == 2 and rows[1]["kl"] is not None and rows[0] == again[0]


def test_no_keep_keeps_nothing_and_a_model_directory_is_never_written(art, text_file, model_dirs):
    result = evaluate(art, text_file, "--no-keep")
    assert "kept in" not in result.stdout and not (art / kept.EVALUATIONS).exists()
    before = sorted(p.name for p in model_dirs["gpt2"].iterdir())
    result = run("evaluate", model_dirs["gpt2"], "--data", text_file, *EVALUATE)
    assert result.exit_code == 0 and "kept in" not in result.stdout
    assert sorted(p.name for p in model_dirs["gpt2"].iterdir()) == before


def test_a_folder_that_cannot_be_written_is_a_warning_and_the_result_still_prints(art, text_file, monkeypatch,
                                                                                tmp_path):
    def refuse(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(kept, "replace_file", refuse)  # as a read-only folder (the tests may run as root)
    result = run("evaluate", art, "--data", text_file, *EVALUATE, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "ppl " in result.stdout and "kept in" not in result.stdout
    [line] = warnings_of(result)
    assert line.startswith(f"warning: could not keep the result in {art}: Permission denied") and "--json FILE" in line
    assert json.loads((tmp_path / "e.json").read_text())["kept_in"] is None
    assert not (art / kept.EVALUATIONS).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_artifact_still_evaluates(art, text_file):
    art.chmod(0o555)
    try:
        result = run("evaluate", art, "--data", text_file, *EVALUATE)
    finally:
        art.chmod(0o755)
    assert result.exit_code == 0 and "ppl " in result.stdout, result.output
    assert warnings_of(result)[0].startswith(f"warning: could not keep the result in {art}")


def test_the_python_api_keeps_nothing_unless_asked(art, text_file, model_dirs):
    result = hypercompress.evaluate(str(art), data=text_file, seq_len=32, max_windows=2)
    assert result.kept_in is None and not (art / kept.EVALUATIONS).exists()
    result = hypercompress.evaluate(str(art), data=text_file, seq_len=32, max_windows=2, keep=True)
    assert result.kept_in == str(art / kept.EVALUATIONS) and kept_rows(art)[0]["ppl"] == result.ppl
    with pytest.raises(UserError, match="not one: pass keep=False"):
        hypercompress.evaluate(str(model_dirs["llama"]), data=text_file, keep=True)


def test_plot_finds_evaluated_artifacts(art, text_file, sealed, tmp_path):
    evaluate(art, text_file)
    other = shutil.copytree(sealed, art.parent / "other")
    evaluate(other, text_file)
    evaluate(other, text_file, "--max-windows", 3)  # other windows: another series
    result = run("plot", art.parent, "--out", tmp_path / "rd.png")
    assert result.exit_code == 0 and not warnings_of(result), result.output
    from hypercompress.analysis.rate_distortion import collect

    series = collect(art.parent)
    bpw = json.loads((art / artifact.MANIFEST).read_text())["totals"]["bits_per_weight"]
    same = series[f"evaluate {text_file} (2×32 tokens, float32)"]
    assert sorted(label for _, _, label in same) == ["other", "rtn3"]
    assert all(point[0] == bpw for point in same)  # the file's bits per weight
    assert [label for _, _, label in series[f"evaluate {text_file} (3×32 tokens, float32)"]] == ["other"]
    assert "3 points in 2 series" in result.stdout


def _oversized(file):
    with open(file, "wb") as handle:  # sparse: no disk space taken
        handle.truncate(kept.MAX_BYTES + 1)


def _hostile(kind):
    rows = {"format": kept.FORMAT, "version": 1, "evaluations": []}
    cases = {
        "not-json": lambda f: f.write_text("{"),
        "not-utf8": lambda f: f.write_bytes(b"\xff\xfe{"),
        "deep": lambda f: f.write_text("[" * 100_000),
        "oversized": _oversized,
        "fifo": lambda f: os.mkfifo(f),
        "dev-zero-link": lambda f: os.symlink("/dev/zero", f),
        "folder": lambda f: f.mkdir(),
        "other-format": lambda f: f.write_text(json.dumps({**rows, "format": "x" * 10_000})),
        "list": lambda f: f.write_text("[]"),
        "too-many-rows": lambda f: f.write_text(json.dumps({**rows, "evaluations": [{}] * (kept.MAX_ROWS + 1)})),
    }
    return cases[kind]


HOSTILE = ["not-json", "not-utf8", "deep", "oversized", "fifo", "dev-zero-link", "folder", "other-format", "list",
           "too-many-rows"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_file_is_one_warning_for_inspect_and_plot_and_unread_by_load(kind, art, tmp_path):
    file = art / kept.EVALUATIONS
    _hostile(kind)(file)
    artifact.load(art)
    shown = run("inspect", art, "--json", tmp_path / "i.json")
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    [line] = warnings_of(shown)
    assert line.startswith("warning: ") and str(file) in line and "ignored it" in line
    assert json.loads((tmp_path / "i.json").read_text())["evaluations"] == []
    plotted = run("plot", art.parent, "--out", tmp_path / "rd.png")
    assert plotted.exit_code == 2 and "Traceback" not in plotted.output
    lines = warnings_of(plotted)
    assert lines[0].startswith("warning: ") and str(file) in lines[0] and "skipped it" in lines[0]
    assert lines[-1].startswith("error: no results") and "1 malformed file skipped" in lines[-1]


def test_a_hostile_file_is_replaced_by_the_next_evaluation(art, text_file):
    (art / kept.EVALUATIONS).write_text("{")
    result = evaluate(art, text_file)
    assert "replacing it with this evaluation" in result.stderr
    assert len(kept_rows(art)) == 1


@pytest.mark.parametrize("row", [
    {"ppl": "30"}, {"ppl": True}, {"ppl": -1}, {"ppl": 10 ** 400}, {"top1": 2.0}, {"kl": None, "windows": -3},
    {"protocol": "\x1b[2Jcleared"}, {"data": 5}, {"tasks": {"t": {"acc": "high"}}}, [1], "row",
])
def test_malformed_rows_are_dropped_with_one_warning_and_the_rest_shown(row, art, text_file, tmp_path):
    evaluate(art, text_file)
    document = json.loads((art / kept.EVALUATIONS).read_text())
    document["evaluations"].append(row)
    (art / kept.EVALUATIONS).write_text(json.dumps(document))
    messages = []
    summary = inspect_artifact(art, warn=messages.append)
    assert len(summary["evaluations"]) == 1 and summary["evaluations"][0]["ppl"] > 1
    assert len(messages) == 1 and "1 of 2 evaluations are malformed" in messages[0]
    shown = run("inspect", art)
    assert shown.exit_code == 0 and "\x1b[2J" not in shown.stdout and len(warnings_of(shown)) == 1
    plotted = run("plot", art.parent, "--out", tmp_path / "rd.png")
    assert plotted.exit_code == 0 and "1 points in 1 series" in plotted.stdout, plotted.output


def test_numbers_the_format_cannot_hold_are_kept_as_null():
    class Result:
        ppl, kl, protocol, data = float("nan"), 0.5, "a\nb", "x\x1b"

    row = kept.row_of(Result())
    assert row.ppl is None and row.kl == 0.5 and row.protocol == "a b" and row.data == "x "
