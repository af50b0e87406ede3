"""`export --format hf`, `AutoModelForCausalLM.from_pretrained(artifact)`, and the export command's
bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

import hypercompress
from hypercompress.cli import app

from test_cli import assert_one_line_error

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifacts(model_dirs, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    made = {}
    for arch, stage in (("llama", ["--method", "rtn", "--set", "bits=4", "--set", "group_size=32"]),
                        ("gpt2", ["--method", "svd", "--set", "rank=8"]),
                        ("qwen3", ["--method", "rtn", "--set", "bits=3", "--set", "group_size=16"]),
                        ("olmo2", ["--method", "rtn", "--set", "bits=4", "--set", "group_size=16"]),
                        ("phi3", ["--method", "rtn", "--set", "bits=4", "--set", "group_size=32"])):
        result = run("compress", model_dirs[arch], *stage, "--out", base / arch)
        assert result.exit_code == 0, result.output
        made[arch] = base / arch
    return made


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "olmo2", "phi3"])
def test_hf_export_loads_anywhere_with_the_artifacts_weights(arch, artifacts, tokens, tmp_path):
    out = tmp_path / "hf"
    result = run("export", artifacts[arch], "--format", "hf", "--dtype", "float32", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and "quantization_config" not in config
    dense = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    compressed, _ = hypercompress.load(artifacts[arch], fast=False)
    with torch.inference_mode():
        expected = compressed(tokens).logits
        assert torch.allclose(dense(tokens).logits, expected, atol=1e-4 * expected.abs().max().item())


def test_from_pretrained_rebuilds_the_compressed_modules(artifacts, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(artifacts["llama"])
    reference, _ = hypercompress.load(artifacts["llama"], fast=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.inference_mode():
        expected = reference(tokens).logits
        assert torch.allclose(model(tokens).logits, expected, atol=1e-4 * expected.abs().max().item())
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(artifacts["llama"], dtype=torch.bfloat16)
    assert bf16.model.norm.weight.dtype == torch.bfloat16
    assert all(b.startswith("int4 tinygemm g32 (cpu)") for b in bf16.hypercompress_backends.values())
    with torch.inference_mode():
        assert torch.allclose(bf16(tokens).logits.float(), expected, atol=3e-2 * expected.abs().max().item())


def test_without_hypercompress_transformers_refuses_the_artifact(artifacts):
    """Never a silently random model: plain transformers names the unknown model type."""
    code = ("import sys, transformers\n"
            "try:\n"
            f"    transformers.AutoModelForCausalLM.from_pretrained({str(artifacts['llama'])!r})\n"
            "except ValueError as exc:\n"
            "    print('REFUSED', exc)\n"
            "    sys.exit(0)\n"
            "sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hypercompress" in done.stdout


def test_export_bad_inputs_leave_nothing(artifacts, tmp_path):
    out = tmp_path / "x"
    assert_one_line_error(run("export", artifacts["llama"], "--format", "onnx", "--out", out), "onnx", "gguf")
    assert_one_line_error(run("export", tmp_path / "missing", "--format", "hf", "--out", out), "not found")
    assert_one_line_error(run("export", artifacts["llama"], "--format", "hf", "--dtype", "int3", "--out", out),
                          "int3")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no .partial folder left behind
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    assert_one_line_error(run("export", artifacts["llama"], "--format", "hf", "--out", taken), "already exists")
