"""Progress in logs (a line at least every LINE_EVERY seconds, heartbeat included) and the timeline
whose steps add up to a run's wall time."""

from __future__ import annotations

import io
import re

import pytest
from typer.testing import CliRunner

from hypercompress.cli import app
from hypercompress.cli.progress import LINE_EVERY, LineProgress
from hypercompress.progress import Timeline


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stamps(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"^\[\s*(\d+) s\]", text, flags=re.M)]


def test_a_silent_step_still_gets_a_line_every_few_seconds():
    """One GPTQ block that takes minutes calls back only when it ends: the heartbeat's ticks keep
    the log moving with the running state, and the estimate comes from the finished blocks."""
    clock, out = FakeClock(), io.StringIO()
    lines = LineProgress(out, every=LINE_EVERY, clock=clock)
    lines("stage 1: gptq", 0, 4)
    for second in range(1, 300):  # the heartbeat calls tick() every second
        clock.now += 1
        if second == 120:
            lines("stage 1: gptq", 1, 4)
        lines.tick()
    times = stamps(out.getvalue())
    gaps = [b - a for a, b in zip([0.0] + times, times + [299.0])]
    assert max(gaps) <= LINE_EVERY <= 30
    assert "stage 1: gptq: 1/4 (25%) | 180 s in this step, about 5 min left" in out.getvalue()
    assert "0/4 (0%) | 110 s in this step" in out.getvalue()


def test_lines_mark_each_start_and_end_and_stay_quiet_between_ticks():
    clock, out = FakeClock(), io.StringIO()
    lines = LineProgress(out, every=10, clock=clock)
    lines("loading m", 0, 1)
    clock.now += 3
    lines("loading m", 1, 1)
    lines.tick()  # 0 s since the last line: nothing
    lines("evaluating", 0, 8, "batch of 4")
    for done in range(1, 9):
        clock.now += 2
        lines("evaluating", done, 8)
    text = out.getvalue().splitlines()
    assert text[0].startswith("[     0 s] loading m | 0 s in this step")
    assert text[1].startswith("[     3 s] loading m: done")
    assert text[2] == "[     3 s] evaluating: 0/8 (0%) | 0 s in this step | batch of 4"
    assert text[-1].startswith("[    19 s] evaluating: 8/8 (100%) | 16 s in this step")
    assert len(text) == 5  # one in-between line (10 s after the start line), not one per batch


def test_a_resumed_step_estimates_from_the_blocks_done_in_this_run():
    clock, out = FakeClock(), io.StringIO()
    lines = LineProgress(out, every=10, clock=clock)
    lines("stage 0: gptq", 10, 30, "resumed after block 9")
    clock.now += 20
    lines("stage 0: gptq", 12, 30)
    assert "12/30 (40%) | 20 s in this step, about 3 min left" in out.getvalue()  # 10 s per block, 18 left


def test_a_heartbeat_after_a_finished_step_says_the_run_is_still_working():
    clock, out = FakeClock(), io.StringIO()
    lines = LineProgress(out, every=10, clock=clock)
    lines("writing the artifact", 1, 1)
    clock.now += 11
    lines.tick()
    assert out.getvalue().splitlines()[-1] == "[    11 s] still working after 'writing the artifact'"


def test_the_timeline_covers_every_second_once():
    clock = FakeClock()
    timeline = Timeline("checking", clock=clock)
    clock.now += 1
    timeline.mark("loading")
    clock.now += 5
    tracked = timeline.track(lambda *args: None)
    tracked("stage 0: rtn", 0, 2)
    clock.now += 2
    tracked("stage 0: rtn", 2, 2)
    timeline.mark("loading")  # met again: adds to its row
    clock.now += 1
    timeline.finish()
    clock.now += 50  # after finish: nothing counts
    assert timeline.rows() == [{"step": "checking", "seconds": 1.0}, {"step": "loading", "seconds": 6.0},
                               {"step": "stage 0: rtn", "seconds": 2.0}]
    assert timeline.wall_seconds == 9.0


def test_compress_accounts_for_its_whole_call(model_dirs, calib_file, tmp_path):
    """summary["timeline"] adds up to summary["wall_seconds"], and that is the time the call took
    (planning included), up to the few statements before its first mark."""
    import time

    import hypercompress

    start = time.perf_counter()
    result = hypercompress.compress(str(model_dirs["llama"]), target_bpw=6.0, overrides=["group_size=32"],
                                    calib=calib_file, calib_samples=2, calib_len=32, out=tmp_path / "a")
    outside = time.perf_counter() - start
    summary = result.summary
    steps = [row["step"] for row in summary["timeline"]]
    assert sum(row["seconds"] for row in summary["timeline"]) == pytest.approx(summary["wall_seconds"], abs=0.01)
    assert -0.001 <= outside - summary["wall_seconds"] < 0.5  # (wall_seconds is rounded to ms)
    for expected in ("planning: sensitivity", "planning: fitting the plan", "planning: planned vs uniform",
                     "stage 1: gptq", "writing the artifact"):
        assert any(step.startswith(expected) for step in steps), (expected, steps)


def test_a_piped_compress_prints_progress_lines_and_a_time_table_that_adds_up(model_dirs, calib_file, tmp_path):
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--target-bpw", "6", "--set",
                                      "group_size=32", "--calib", str(calib_file), "--calib-samples", "2",
                                      "--calib-len", "32", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    progress = result.stderr
    for section in ("loading", "drawing calibration windows", "planning: sensitivity", "planning: fitting",
                    "planning: planned vs uniform recipes (GPTQ trials)", "stage 1: gptq ×", "writing the artifact"):
        assert re.search(rf"^\[\s*\d+ s\] {re.escape(section)}", progress, flags=re.M), (section, progress)
    assert "gptq+gptq" not in result.stdout  # the planned pass has a readable name
    table = result.stdout[result.stdout.index("where the time went"):]
    rows = re.findall(r"│ (.+?)\s+│\s+([\d.]+) │\s+(\d+)% │", table)
    seconds = {step: float(value) for step, value, _ in rows}
    assert "start-up (python, imports, options)" in seconds and "total" in seconds
    parts = [value for step, value in seconds.items() if step != "total"]
    assert sum(parts) == pytest.approx(seconds["total"], abs=0.05 * len(parts) + 0.05)


def test_a_three_argument_callback_still_works(model_dirs, tmp_path):
    """progress(section, done, total) callbacks written before the note existed are called without it."""
    import hypercompress

    seen = []
    hypercompress.compress(str(model_dirs["llama"]), method="rtn", out=None,
                           progress=lambda section, done, total: seen.append((section, done, total)))
    assert any(section.startswith("stage 0: rtn") for section, _, _ in seen)


def test_a_stage_books_its_time_from_its_start(model_dirs):
    """Each pass says it started before its first module: a method whose first module takes minutes
    (kan) had its time booked under the step before it."""
    import hypercompress

    seen = []
    hypercompress.compress(str(model_dirs["llama"]), recipe=[{"method": "rtn", "bits": 4},
                                                             {"method": "svd", "rank": 4, "targets": ["lm_head"]}],
                           out=None, progress=lambda section, done, total, note="": seen.append((section, done, note)))
    for stage in ("stage 0: rtn", "stage 1: svd"):
        first = next(row for row in seen if row[0] == stage)
        assert first[1:] == (0, "starting"), (stage, first)


def test_a_piped_evaluate_reports_each_step_and_accounts_for_its_time(model_dirs, text_file, tmp_path):
    art = tmp_path / "art"
    assert CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--method", "rtn", "--out", str(art)]
                              ).exit_code == 0
    result = CliRunner().invoke(app, ["evaluate", str(art), "--data", str(text_file), "--seq-len", "32",
                                      "--max-windows", "6", "--batch-size", "2", "--teacher",
                                      str(model_dirs["llama"]), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    for section in (f"loading {art}", f"loading teacher {model_dirs['llama']}", "tokenizing the text",
                    "perplexity and KL vs the teacher (windows): 0/6", "perplexity and KL vs the teacher (windows): 6/6", "keeping the result"):
        assert re.search(rf"^\[\s*\d+ s\] {re.escape(section)}", result.stderr, flags=re.M), (section, result.stderr)
    import json

    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert sum(r["seconds"] for r in evaluation["timeline"]) == pytest.approx(evaluation["wall_seconds"], abs=0.01)
    assert "where the time went" in result.stdout and "│ total" in result.stdout


def test_evaluate_draws_bars_by_default_and_progress_false_is_silent(model_dirs, text_file, capsys, monkeypatch):
    import hypercompress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    options = dict(data=str(text_file), seq_len=32, max_windows=2)
    quiet = hypercompress.evaluate(str(model_dirs["llama"]), progress=False, **options)
    assert capsys.readouterr().err == ""
    drawn = hypercompress.evaluate(str(model_dirs["llama"]), **options)
    assert "loading" in capsys.readouterr().err and drawn.ppl == quiet.ppl


def test_the_gguf_dequantization_bar_follows_transformers_switch(capsys):
    """transformers' GGUF loader draws its bar with tqdm itself: off while transformers' bars are off
    (the CLI, a library call with its own bars), shown while they are on, its tqdm put back after."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as transformers_logging

    from hypercompress.sources.models import gguf_bar_as_transformers_bars

    original = gguf_utils.tqdm
    was_on = transformers_logging.is_progress_bar_enabled()
    try:
        transformers_logging.enable_progress_bar()
        with gguf_bar_as_transformers_bars():
            assert gguf_utils.tqdm is original  # shown as tqdm shows it (--verbose)
        transformers_logging.disable_progress_bar()
        with gguf_bar_as_transformers_bars():
            for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
                pass
            assert gguf_utils.tqdm is not original
        assert "de-quantizing" not in capsys.readouterr().err and gguf_utils.tqdm is original
    finally:
        (transformers_logging.enable_progress_bar if was_on else transformers_logging.disable_progress_bar)()
