"""edit: a concept erased from the residual stream, folded into the weights.

A probe is at chance afterwards; the fold leaves logits unchanged where the residual holds nothing
along the erased functional; stored kinds keep their form; the command's bad inputs get one line,
exit 2, and nothing written."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

import hypercompress
from hypercompress.analysis.erasure import Erasure, fit_erasure, fold_erasure
from hypercompress.apply import apply_recipe
from hypercompress.cli import app
from hypercompress.errors import UserError
from hypercompress.recipe import Recipe

from conftest import make_model, make_tokenizer, tied_llama

runner = CliRunner()
NEUTRAL = [f"w{i}" for i in range(20, 120)]


def marked_lines(markers: list[str], count: int, seed: int) -> list[str]:
    """Lines of 10 neutral words, 5 of them replaced by marker words: the concept is 'holds a marker'."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = [rng.choice(NEUTRAL) for _ in range(10)]
        for _ in range(5):
            words[rng.randrange(10)] = rng.choice(markers)
        lines.append(" ".join(words))
    return lines


CONCEPT = marked_lines([f"w{i}" for i in range(10)], 100, seed=0)
CONTRAST = marked_lines([f"w{i}" for i in range(10, 20)], 100, seed=1)


def neutral_windows() -> torch.Tensor:
    return torch.randint(21, 121, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,method", [("llama", "leace"), ("gpt2", "ablation"), ("qwen3", "leace"),
                                         ("phi3", "leace"), ("phi", "leace")])  # phi: ablation left the concept
                                                                                # readable after its final LayerNorm
def test_after_the_edit_a_fresh_probe_is_at_chance(arch, method):
    model = make_model(arch)
    report = hypercompress.edit(model, CONCEPT, CONTRAST, tokenizer=make_tokenizer(), unrelated=neutral_windows(),
                                heldout=neutral_windows(), method=method, kl_budget=1.0, progress=False)
    assert max(r["probe_before"] for r in report["layers"]) > 0.9  # the concept is there to erase
    assert report["steps"], report["stopped"]
    for row in report["layers"]:
        assert row["probe_after"] <= report["chance_bound"], row
    assert report["unrelated"]["after"]["kl"] < 0.01  # neutral text barely moves


def _residual_functional(model, ids: torch.Tensor, u: torch.Tensor) -> float:
    """max |u . h| over every layer's residual vectors (the final normed state aside)."""
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
    return max(float((s.double() @ u).abs().max()) for s in states)


def test_the_fold_leaves_logits_unchanged_where_the_residual_is_orthogonal_to_the_erased_functional():
    """Make a tied Llama's residual orthogonal to u (an ablation of u), then fold an oblique erasure
    whose functional is u: the logits do not move. On the original model the same fold moves them."""
    torch.manual_seed(0)
    hidden = 64
    u = torch.nn.functional.normalize(torch.randn(hidden, dtype=torch.float64), dim=0)
    v = torch.randn(hidden, dtype=torch.float64)
    oblique = Erasure((v / (u @ v))[:, None], u[None, :], None, "leace")  # A = v u^T / (u . v): A A = A
    assert torch.allclose(oblique.projection() @ oblique.projection(), oblique.projection(), atol=1e-9)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))

    original = tied_llama(96)
    before_original = original(input_ids=ids).logits
    fold_erasure(original, oblique)
    assert (original(input_ids=ids).logits - before_original).abs().max() > 1e-3  # the test can fail

    model = tied_llama(96)
    fold_erasure(model, Erasure(u[:, None], u[None, :], None, "ablation"))
    assert _residual_functional(model, ids, u) < 1e-5  # the ablation held at every layer
    before = model(input_ids=ids).logits
    fold_erasure(model, oblique)
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)


def test_leace_fitted_on_features_equalises_the_class_means():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(400, 16, generator=generator, dtype=torch.float64)
    z = (torch.rand(400, generator=generator) > 0.5).long()
    x[z == 1] += torch.linspace(-1, 1, 16, dtype=torch.float64)
    for method in ("leace", "ablation"):
        erased = fit_erasure(x, z, method)(x)
        assert torch.allclose(erased[z == 1].mean(0), erased[z == 0].mean(0), atol=1e-9)


def test_quantized_and_dense_writers_keep_their_kind():
    """An 8-bit RTN model: the quantized writers stay quantized (codes re-rounded on their own grid,
    little of the functional left); the dense norms are untouched."""
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([{"method": "rtn", "bits": 8, "group_size": 32}]))
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    u = torch.nn.functional.normalize(torch.randn(64, dtype=torch.float64), dim=0)
    rows = fold_erasure(model, Erasure(u[:, None], u[None, :], None, "ablation"))
    assert {n: type(m).__name__ for n, m in model.named_modules()} == kinds
    quantized = [r for r in rows if r["kind"] == "quant"]
    assert quantized and all(r["left"] < 0.1 for r in quantized)
    assert all(r["left"] < 1e-6 for r in rows if r["kind"] == "dense")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_command_writes_an_artifact_with_its_report(tmp_path, model_dirs, text_file):
    concept, contrast = _write(tmp_path / "c.txt", CONCEPT), _write(tmp_path / "n.txt", CONTRAST)
    out = tmp_path / "edited"
    result = runner.invoke(app, ["edit", str(model_dirs["llama"]), "--concept", concept, "--contrast", contrast,
                                 "--unrelated", str(text_file), "--heldout", str(text_file), "--out", str(out),
                                 "--eval-len", "32", "--eval-windows", "2", "--kl-budget", "1"])
    assert result.exit_code == 0, result.output
    assert "held-out probe accuracy" in result.output
    manifest = json.loads((out / "hypercompress.json").read_text())
    assert manifest["recipe"][-1]["method"] == "edit:ablation"
    assert manifest["edit"]["best_probe_after"] <= manifest["edit"]["chance_bound"]
    assert "| layer | probe before |" in (out / "edit.md").read_text()
    edited, _ = hypercompress.load(out)  # an ordinary artifact
    report = json.loads((out / "edit.json").read_text())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(edited(input_ids=ids).logits).all() and report["steps"]


def test_the_python_api_takes_files_or_lines_and_a_source(tmp_path, model_dirs, text_file):
    """hypercompress.edit reads example files or takes lists, cuts a text into windows, and checks the
    examples before the model loads (a missing model is never reached)."""
    concept, contrast = _write(tmp_path / "c.txt", CONCEPT), _write(tmp_path / "n.txt", CONTRAST)
    options = dict(unrelated=text_file, eval_len=32, eval_windows=2, kl_budget=1.0, progress=False)
    from_files = hypercompress.edit(str(model_dirs["llama"]), concept, contrast, **options)
    from_lists = hypercompress.edit(str(model_dirs["llama"]), CONCEPT, CONTRAST, **options)
    assert from_files["steps"] and from_files["layers"] == from_lists["layers"]
    assert "2 windows of 32 tokens" in from_files["protocol"]
    with pytest.raises(UserError, match="concept"):
        hypercompress.edit(str(tmp_path / "no-model"), CONCEPT[:2], CONTRAST, **options)
    with pytest.raises(UserError, match="--method"):
        hypercompress.edit(str(tmp_path / "no-model"), CONCEPT, CONTRAST, method="erase", **options)


def test_an_artifact_keeps_its_recipe_and_kinds(tmp_path, model_dirs, text_file):
    quantized = tmp_path / "q"
    result = runner.invoke(app, ["compress", str(model_dirs["llama"]), "--method", "rtn", "--set", "bits=8", "--set", "group_size=32",
                                 "--out", str(quantized)])
    assert result.exit_code == 0, result.output
    concept, contrast = _write(tmp_path / "c.txt", CONCEPT), _write(tmp_path / "n.txt", CONTRAST)
    out = tmp_path / "edited"
    result = runner.invoke(app, ["edit", str(quantized), "--concept", concept, "--contrast", contrast,
                                 "--unrelated", str(text_file), "--out", str(out), "--eval-len", "32",
                                 "--eval-windows", "2", "--kl-budget", "1"])
    assert result.exit_code == 0, result.output
    before = json.loads((quantized / "hypercompress.json").read_text())
    after = json.loads((out / "hypercompress.json").read_text())
    assert after["recipe"][:-1] == before["recipe"] and after["original_params"] == before["original_params"]
    assert after["modules"] == before["modules"]  # same kinds, same layouts
    assert "re-rounded" in (out / "edit.md").read_text()


@pytest.mark.parametrize("case,needle", [
    ("empty", "holds no text"),
    ("identical", "the same lines"),
    ("few", "usable lines"),
    ("model", "model not found"),
    ("method", "--method"),
    ("budget", "nothing was erased"),
    ("binary", "not UTF-8 text"),
    ("short", "fewer than one window of --eval-len"),
    ("post-norm", "olmo2 normalizes its sublayers' outputs"),
    ("sandwich-norm", "gemma2 normalizes its sublayers' outputs"),
])
def test_bad_inputs_get_one_line_and_write_nothing(tmp_path, model_dirs, text_file, case, needle):
    concept, contrast = _write(tmp_path / "c.txt", CONCEPT), _write(tmp_path / "n.txt", CONTRAST)
    model, extra = str(model_dirs["llama"]), []
    if case == "empty":
        concept = _write(tmp_path / "empty.txt", [""])
    elif case == "identical":
        contrast = concept
    elif case == "few":
        concept = _write(tmp_path / "few.txt", CONCEPT[:3])
    elif case == "model":
        model = str(tmp_path / "no-such-model")
    elif case == "method":
        extra = ["--method", "magic"]
    elif case == "binary":
        concept = str(tmp_path / "random.bin")
        (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(5000))
    elif case == "short":
        text_file = tmp_path / "short.txt"
        text_file.write_text("w1 w2 w3 w4 w5\n")
    elif case in ("post-norm", "sandwich-norm"):
        model = str(model_dirs["olmo2" if case == "post-norm" else "gemma2"])
    else:
        extra = ["--kl-budget", "1e-9"]  # no direction fits: an artifact would be the source again
    out = tmp_path / "edited"
    result = runner.invoke(app, ["edit", model, "--concept", concept, "--contrast", contrast, "--unrelated",
                                 str(text_file), "--out", str(out), "--eval-len", "32", "--eval-windows", "2", *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()  # progress lines may come first (stderr), then one error line
    assert lines[-1].startswith("error:") and needle in lines[-1], result.output
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("edited*"))


def test_the_original_s_perplexity_from_its_cached_log_probs_matches_evaluate():
    from hypercompress.analysis.edit import _quality_of_teacher
    from hypercompress.eval.perplexity import evaluate_windows, teacher_log_probs

    model = make_model("llama")
    windows = torch.randint(1, 120, (6, 16), generator=torch.Generator().manual_seed(0))  # 4 + 2 per batch
    cached = _quality_of_teacher(teacher_log_probs(model, windows), windows)
    assert cached["ppl"] == pytest.approx(evaluate_windows(model, windows)["ppl"], rel=1e-9)
