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

from conftest import ARCHS, make_tokenizer
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
                        ("phi3", ["--method", "rtn", "--set", "bits=4", "--set", "group_size=32"]),
                        ("phi", ["--method", "svd", "--set", "rank=8"]),
                        ("gemma2", ["--method", "rtn", "--set", "bits=4", "--set", "group_size=16"]),
                        ("gemma3", ["--method", "factor_embedding", "--set", "rank=8", "--set", "targets=embed_tokens$"]),  # the scaled embedding
                        ("mixtral", ["--method", "rtn", "--set", "bits=3", "--set", "group_size=16"]),  # experts fused back
                        ("qwen3_moe", ["--method", "rtn", "--set", "bits=4", "--set", "group_size=16"]),
                        ("olmoe", ["--method", "svd", "--set", "rank=8"])):
        result = run("compress", model_dirs[arch], *stage, "--out", base / arch)
        assert result.exit_code == 0, result.output
        made[arch] = base / arch
    return made


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_export_loads_anywhere_with_the_artifacts_weights(arch, artifacts, tokens, tmp_path):
    out = tmp_path / "hf"
    result = run("export", artifacts[arch], "--format", "hf", "--dtype", "float32", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"gemma3": "gemma3_text"}.get(arch, arch) and "quantization_config" not in config
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


@pytest.mark.parametrize("fmt, option, needle", [
    ("hf", ["--gguf-type", "Q8_0"], "--gguf-type does not apply to --format hf (its options: --dtype)"),
    ("gguf", ["--dtype", "float16"], "--dtype does not apply to --format gguf"),
    ("hf", ["--dense-fallback"], "--dense-fallback does not apply to --format hf"),
    ("gguf", ["--force-type"], "--force-type needs --gguf-type"),
])
def test_an_option_of_another_format_is_refused_not_ignored(artifacts, tmp_path, fmt, option, needle):
    out = tmp_path / "x"
    assert_one_line_error(run("export", artifacts["llama"], "--format", fmt, *option, "--out", out), needle)
    assert not out.exists()
    from hypercompress.exporters import export
    from hypercompress.errors import UserError

    with pytest.raises(UserError, match="does not apply to --format hf"):
        export(artifacts["llama"], "hf", out, gguf_typo="F32")


def test_every_format_option_is_a_writer_parameter_and_a_cli_option():
    """FORMATS is the one table: a format's options are its writer's keywords, each a CLI flag."""
    import inspect

    from hypercompress.cli.export import export as cli_export
    from hypercompress.exporters import FORMATS, flag, writer

    cli_flags = {f for p in inspect.signature(cli_export).parameters.values()
                 for f in getattr(p.default, "param_decls", ()) or ()}
    for fmt, spec in FORMATS.items():
        keywords = set(list(inspect.signature(writer(fmt)).parameters)[4:])
        assert keywords == set(spec.options), fmt
        assert {flag(o) for o in spec.options} <= cli_flags, fmt


def test_llama3_rope_scaling_survives_compress_reload_and_hf_export(tmp_path, tokens):
    """Llama-3.x's "llama3" RoPE scaling lives in the config: the artifact and the HF export keep it
    (same logits); the GGUF export, which would need llama.cpp's rope_freqs tensor, refuses by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         rope_parameters=scaling)).eval()
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    assert run("compress", tmp_path / "src", "--method", "rtn", "--set", "bits=4", "--set", "group_size=32",
               "--out", tmp_path / "a").exit_code == 0
    compressed, _ = hypercompress.load(tmp_path / "a", fast=False)
    assert compressed.config.rope_parameters["rope_type"] == "llama3"
    assert run("export", tmp_path / "a", "--format", "hf", "--dtype", "float32", "--out", tmp_path / "hf").exit_code == 0
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    long = torch.randint(1, 121, (1, 200), generator=torch.Generator().manual_seed(0))  # past the original 64
    with torch.inference_mode():
        expected = compressed(long).logits
        assert torch.allclose(dense(long).logits, expected, atol=1e-4 * expected.abs().max().item())
    result = run("export", tmp_path / "a", "--format", "gguf", "--out", tmp_path / "gguf")
    assert result.exit_code == 2 and "rope scaling 'llama3'" in result.output and not (tmp_path / "gguf").exists()


def test_save_pretrained_of_a_compressed_model_refuses_and_says_how(artifacts, tmp_path, tokens):
    """A model loaded from an artifact (or compressed in memory, or a deep copy of either) refuses
    save_pretrained / push_to_hub in one line instead of writing a plain config over compressed
    tensors (transformers would reload that as a random model); densified, it saves as usual."""
    import copy
    import pickle

    from hypercompress.apply import apply_recipe
    from hypercompress.errors import UserError
    from hypercompress.exporters.dense import densify
    from hypercompress.recipe import Recipe

    from conftest import make_model

    loaded = transformers.AutoModelForCausalLM.from_pretrained(artifacts["llama"])
    compressed = make_model("llama")
    apply_recipe(compressed, Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 32}]))
    pickled = pickle.loads(pickle.dumps(loaded))  # torch.save of the whole model: its fast paths left out
    assert torch.equal(pickled(tokens).logits, loaded(tokens).logits)
    for model in (loaded, compressed, copy.deepcopy(loaded), pickled):
        for call in (model.save_pretrained, model.push_to_hub):
            with pytest.raises(UserError, match=r"would write a plain config over compressed tensors.*hypercompress"):
                call(str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists()
    expected = loaded(tokens).logits
    densify(loaded, torch.float32)
    loaded.save_pretrained(tmp_path / "dense")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.allclose(again(tokens).logits, expected, atol=1e-4 * expected.abs().max().item())


def test_every_command_has_its_public_function(artifacts, tmp_path):
    """hypercompress.inspect is what `inspect --json` writes; hypercompress.export what `export` writes."""
    result = run("inspect", artifacts["llama"], "--json", tmp_path / "inspect.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "inspect.json").read_text()) == json.loads(json.dumps(hypercompress.inspect(artifacts["llama"])))
    report = hypercompress.export(artifacts["llama"], "hf", tmp_path / "hf", dtype="float32")
    assert report["format"] == "hf" and (tmp_path / "hf" / "model.safetensors").is_file()
    assert {"inspect", "export", "compress", "apply_recipe", "evaluate", "load", "analyze", "edit"} <= set(hypercompress.__all__)
