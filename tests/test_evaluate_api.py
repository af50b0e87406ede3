"""hypercompress.evaluate from Python: a loaded model or a source, a text or a file, the same numbers
and protocol the CLI prints; bad input is one UserError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hypercompress
from hypercompress.sources.data import tokenize, windows
from hypercompress.errors import UserError
from hypercompress.eval import evaluate_windows

from conftest import make_model, make_tokenizer
from test_cli import run


def test_a_loaded_model_on_the_text_itself():
    model, tokenizer = make_model("llama"), make_tokenizer()
    text = " ".join(f"w{i % 97}" for i in range(400))
    result = hypercompress.evaluate(model, text, tokenizer=tokenizer, seq_len=32, max_windows=3)
    expected = evaluate_windows(model, windows(tokenize(tokenizer, text), 32, 3))
    assert result.ppl == pytest.approx(expected["ppl"], rel=1e-9) and result.windows == 3 and result.tokens == 96
    assert result.kl is None and result.tasks is None and result.dtype == "float32" and result.device == "cpu"
    assert result.protocol.startswith("text (") and "first 3 of 12 non-overlapping windows of 32" in result.protocol


def test_a_source_and_a_file_match_the_cli(model_dirs, text_file, tmp_path):
    source = str(model_dirs["llama"])
    result = hypercompress.evaluate(source, data=text_file, seq_len=32, max_windows=2, teacher=source)
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.top1 == 1.0
    report = tmp_path / "e.json"
    cli = run("evaluate", source, "--data", text_file, "--seq-len", 32, "--max-windows", 2, "--teacher", source,
              "--json", report)
    assert cli.exit_code == 0, cli.output
    data = json.loads(report.read_text())
    for key in ("ppl", "kl", "top1", "windows", "protocol", "model", "data", "teacher", "dtype", "backends"):
        assert data[key] == pytest.approx(getattr(result, key)) if isinstance(data[key], float) \
            else data[key] == getattr(result, key), key
    in_memory = hypercompress.evaluate(make_model("llama"), tokenizer=make_tokenizer(), data=text_file,
                                       seq_len=32, max_windows=2)
    assert in_memory.ppl == pytest.approx(result.ppl, rel=1e-6)  # the saved directory is that model


@pytest.mark.parametrize("call, needle", [
    (lambda m, t, f: hypercompress.evaluate(m, Path(f), tokenizer=t), "pass a file as data="),
    (lambda m, t, f: hypercompress.evaluate(m, f, tokenizer=t), "pass a file as data="),  # a path given as text
    (lambda m, t, f: hypercompress.evaluate(m, "w1 w2", data=f, tokenizer=t), "not both"),
    (lambda m, t, f: hypercompress.evaluate(m, "w1 w2 w3"), "needs its tokenizer"),
    (lambda m, t, f: hypercompress.evaluate(m, data=f, tokenizer=t, dtype=torch.bfloat16), "computes in float32"),
    (lambda m, t, f: hypercompress.evaluate(m, tokenizer=t), "nothing to measure"),
    (lambda m, t, f: hypercompress.evaluate(m, tokenizer=t, teacher=m, tasks="x", task_dir="."), "pass a text"),
    (lambda m, t, f: hypercompress.evaluate(m, "  \n", tokenizer=t), "nothing but whitespace"),
])
def test_bad_python_input_is_one_user_error(call, needle, text_file):
    with pytest.raises(UserError, match=needle):
        call(make_model("gpt2"), make_tokenizer(), str(text_file))
