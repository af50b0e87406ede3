"""The CLI end to end on tiny models, and every bad input: one line, exit code 2, nothing left."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from hypercompress.cli import app
from conftest import message_lines

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact_dir(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama-rtn"
    result = run("compress", model_dirs["llama"], "--method", "rtn", "--set", "bits=3",
                 "--set", "group_size=32", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_compress_evaluate_inspect(artifact_dir, model_dirs, text_file, tmp_path):
    manifest = json.loads((artifact_dir / "hypercompress.json").read_text())
    assert manifest["recipe"] == [{"method": "rtn", "bits": 3, "group_size": 32,
                                   "symmetric": False, "zero_point": "int"}]
    report = tmp_path / "eval.json"
    result = run("evaluate", artifact_dir, "--data", text_file, "--seq-len", 64, "--max-windows", 3,
                 "--teacher", model_dirs["llama"], "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["windows"] == 3 and data["seq_len"] == 64 and data["tokens"] == 192
    assert data["ppl"] > 1 and 0 < data["kl"] and 0 <= data["top1"] <= 1
    assert "first 3 of" in data["protocol"]
    summary_path = tmp_path / "inspect.json"
    result = run("inspect", artifact_dir, "--json", summary_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(summary_path.read_text())
    weights = (artifact_dir / "model.safetensors").stat().st_size
    assert summary["bits_per_weight"] * summary["params"] / 8 == pytest.approx(weights, rel=0.01)
    assert summary["artifact_bytes"] > weights
    assert {m["kind"] for m in summary["modules"]} == {"quant", "dense"}


def test_evaluate_without_teacher_has_null_kl(model_dirs, text_file, tmp_path):
    report = tmp_path / "e.json"
    result = run("evaluate", model_dirs["gpt2"], "--data", text_file, "--seq-len", 32,
                 "--max-windows", 2, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["kl"] is None and data["top1"] is None


def test_recipe_file_and_overrides(model_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: svd\n  keep: 0.3\n  ignore: ['layers\\.0\\.']\n")
    out = tmp_path / "out"
    result = run("compress", model_dirs["llama"], "--recipe", recipe, "--set", "keep=0.2", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "hypercompress.json").read_text())
    assert manifest["recipe"][0]["keep"] == 0.2
    assert manifest["modules"] and all(".layers.1." in name for name in manifest["modules"])


def test_env_prints_versions():
    result = run("env")
    assert result.exit_code == 0 and "torch" in result.output


@pytest.mark.parametrize("args, needles", [
    (["--method", "nope"], ["unknown method 'nope'", "rtn"]),
    (["--method", "rtn", "--set", "bitz=3"], ["bitz", "bits"]),
    (["--method", "rtn", "--set", "bits=9"], ["bits=9"]),
    (["--method", "rtn", "--set", "bits=four"], ["bits", "four"]),
    (["--method", "rtn", "--set", "bits"], ["key=value"]),
    (["--method", "rtn", "--set", "group_size=48"], ["group_size 48"]),
    (["--method", "rtn", "--recipe", "recipes/rtn-w4g64.yaml"], ["exactly one"]),
    (["--recipe", "missing.yaml"], ["recipe file not found"]),
    (["--method", "rtn", "--calib", "missing.txt"], ["--calib missing.txt: file not found"]),
])
def test_bad_compress_input(args, needles, model_dirs, tmp_path):
    out = tmp_path / "out"
    result = run("compress", model_dirs["llama"], *args, "--out", out)
    assert_one_line_error(result, *needles)
    assert list(tmp_path.iterdir()) == []


def test_bad_recipe_files(model_dirs, tmp_path):
    cases = {
        "bad key": ("- method: rtn\n  bitz: 3\n", "unknown key 'bitz'"),
        "bad value": ("- method: svd\n  keep: 2\n", "keep=2"),
        "bad yaml": ("- method: rtn\n  bits: [3\n", "not valid YAML"),
        "no method": ("- bits: 3\n", "'method' key"),
        "bad regex": ("- method: rtn\n  targets: ['(']\n", "bad regex"),
        "no match": ("- method: rtn\n  targets: ['nothing']\n", "selects no module"),
        "tied": ("- method: rtn\n  targets: ['lm_head']\n", "ignore"),
    }
    for name, (text, needle) in cases.items():
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(text)
        model = model_dirs["gpt2"]
        result = run("compress", model, "--recipe", recipe, "--out", tmp_path / "out")
        assert_one_line_error(result, needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"], name


def test_bad_model_sources(tmp_path):
    cases = [
        (tmp_path / "nothing-here", "model not found"),
        (tmp_path / "missing.gguf", "GGUF file not found"),
        ("not-a-model-name", "model not found"),
    ]
    weird = tmp_path / "bert"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases.append((weird, "unsupported architecture 'bert'"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "no config.json"))
    for model, needle in cases:
        result = run("compress", model, "--method", "rtn", "--out", tmp_path / "out")
        assert_one_line_error(result, needle)
        assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(model_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    result = run("compress", model_dirs["llama"], "--method", "rtn", "--out", tmp_path / "out")
    assert_one_line_error(result, "not empty")
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_bad_evaluate_input(artifact_dir, text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4\n")
    cases = [
        (["--data", tmp_path / "missing.txt"], "missing.txt: file not found"),
        (["--data", empty], "holds no text"),
        (["--data", short, "--seq-len", 64], "fewer than seq_len 64"),
        (["--data", text_file, "--seq-len", 100000], "position limit of 256"),
        (["--data", text_file, "--dtype", "float8"], "--dtype float8"),
    ]
    for args, needle in cases:
        result = run("evaluate", artifact_dir, *args, "--json", tmp_path / "r.json")
        assert_one_line_error(result, needle)
        assert not (tmp_path / "r.json").exists()


def _copy(artifact_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact_dir, target)
    return target


def test_tampered_artifact_is_refused(artifact_dir, text_file, tmp_path):
    target = _copy(artifact_dir, tmp_path)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    for args in (["inspect", target], ["evaluate", target, "--data", text_file]):
        assert_one_line_error(run(*args), "sha256", "model.safetensors")


def test_corrupt_or_foreign_manifest_is_refused(artifact_dir, tmp_path):
    target = _copy(artifact_dir, tmp_path)
    manifest = target / "hypercompress.json"
    original = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    assert_one_line_error(run("inspect", target), "corrupt")
    manifest.write_text(json.dumps({**original, "format_version": 99}))
    assert_one_line_error(run("inspect", target), "format version 99")
    manifest.unlink()
    assert_one_line_error(run("inspect", target), "not a hypercompress artifact")
    assert_one_line_error(run("inspect", tmp_path / "nowhere"), "artifact not found")


def test_manifest_shape_mismatch_is_refused(artifact_dir, text_file, tmp_path):
    target = _copy(artifact_dir, tmp_path)
    manifest = target / "hypercompress.json"
    data = json.loads(manifest.read_text())
    first = next(iter(data["modules"].values()))
    first["layout"]["bits"] = 4
    manifest.write_text(json.dumps(data))
    assert_one_line_error(run("evaluate", target, "--data", text_file), "shape")


def test_a_run_refused_for_its_size_at_the_end_leaves_no_checkpoint(model_dirs, calib_file, tmp_path, monkeypatch):
    """The size check after compression refuses: the finished run's checkpoint is removed with it,
    so the next run to the same --out starts instead of asking for --resume."""
    from hypercompress import workflow
    from hypercompress.errors import UserError

    def over(bpw, target, say):
        raise UserError(f"the compressed file stores {bpw:.4f} bpw, over the target")

    monkeypatch.setattr(workflow, "check_stored_size", over)
    out = tmp_path / "sized"
    args = ("compress", model_dirs["llama"], "--target-bpw", 6, "--set", "group_size=32", "--calib", calib_file,
            "--calib-samples", 2, "--calib-len", 32, "--out", out)
    assert_one_line_error(run(*args), "over the target")
    assert not out.exists() and not out.with_name("sized.checkpoint").exists()
    monkeypatch.undo()
    assert run(*args).exit_code == 0


def test_evaluate_refuses_a_teacher_that_scores_other_ids(model_dirs, text_file, tmp_path):
    """A teacher whose vocabulary rows differ is refused in one line before any window is scored (KL
    and top-1 compare id by id); it was an IndexError / RuntimeError traceback."""
    from conftest import make_tokenizer, tied_llama

    teacher = tmp_path / "wide-vocab"
    tied_llama(200).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    result = run("evaluate", model_dirs["llama"], "--data", text_file, "--seq-len", 32, "--max-windows", 1,
                 "--teacher", teacher)
    assert result.exit_code == 2, result.output
    assert "scores 200 vocabulary rows and the model 128" in result.output and "Traceback" not in result.output
