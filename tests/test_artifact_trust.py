"""The strict artifact reader on hand-made hostile artifacts: each refused with one UserError, before any
large read or allocation; inspect refuses what load refuses; values float16 cannot hold are kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from artifact_fuzz import reseal
from conftest import make_model, make_tokenizer

CLI = [sys.executable, "-c", "from hypercompress.cli import main; main()"]
RTN = [{"method": "rtn", "bits": 4, "group_size": 32}]


def save(model, out, steps=RTN):
    params = count_params(model)
    recipe = Recipe.from_list(steps)
    apply_recipe(model, recipe, torch.randint(1, 121, (4, 16), generator=torch.Generator().manual_seed(0)), batch_size=4)
    artifact.round_to_storage(model)
    return artifact.save(model, make_tokenizer(), out, recipe=recipe.to_list(), original_params=params)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return {"llama": save(make_model("llama"), root / "llama"),
            "sparse": save(make_model("llama"), root / "sparse", [{"method": "sparsegpt", "sparsity": 0.5}]),
            "gpt2": save(make_model("gpt2"), root / "gpt2"),
            "gpt2-embed": save(make_model("gpt2"), root / "gpt2-embed", [{**RTN[0], "targets": ["wte$"]}])}


pytestmark = pytest.mark.usefixtures("no_hang")  # a reader that blocks fails instead of hanging


def copy(valid, name, tmp_path):
    return shutil.copytree(valid[name], tmp_path / name)


def edit_manifest(path, change, sealed=True):
    manifest = json.loads((path / "hypercompress.json").read_text())
    change(manifest)
    (path / "hypercompress.json").write_text(json.dumps(manifest))
    if sealed:
        assert reseal(path)
    return path


def refused(path, *words):
    with pytest.raises(UserError) as info:
        artifact.load(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def first_quant(manifest):
    return next(n for n, e in manifest["modules"].items() if e["kind"] == "quant")


@pytest.mark.parametrize("key,value,words", [
    ("in_features", 200_000_000, ["does not fit"]),   # once allocated 2e8-wide buffers
    ("in_features", "64", ["in_features"]),          # a string where the constructor takes an int
    ("bits", 9, ["bits"]),
    ("bits", True, ["bits"]),                       # bool is not an int here
    ("group_size", 0, ["group_size"]),
    ("out_features", -1, ["out_features"]),
    ("surprise", 1, ["surprise"]),                  # an unknown key
])
def test_resealed_layout_lies_are_refused_naming_the_field(valid, tmp_path, key, value, words):
    path = copy(valid, "llama", tmp_path)
    edit_manifest(path, lambda m: m["modules"][first_quant(m)]["layout"].__setitem__(key, value))
    refused(path, *words)


def test_a_layout_that_does_not_fit_its_layer_is_refused(valid, tmp_path):
    path = copy(valid, "llama", tmp_path)

    def swap(manifest):  # a self-consistent 64 x 64 quant layout where the model has a 128 x 64 layer
        name = next(n for n in manifest["modules"] if n.endswith("mlp.up_proj"))
        manifest["modules"][name]["layout"]["out_features"] = 64
    edit_manifest(path, swap)
    refused(path, "does not fit")


def test_a_retargeted_alias_and_a_dense_dtype_lie_are_refused(valid, tmp_path):
    path = copy(valid, "gpt2", tmp_path)
    edit_manifest(path, lambda m: m["aliases"].__setitem__("lm_head.weight", "transformer.ln_f.weight"))
    refused(path, "tied tensors")
    path = shutil.copytree(valid["gpt2"], tmp_path / "wider")
    edit_manifest(path, lambda m: m.__setitem__("dense_dtypes", {"transformer.ln_f.weight": "float32"}))
    refused(path, "transformer.ln_f.weight")


def test_a_sparse_mask_that_disagrees_with_nnz_is_refused_by_load_and_inspect(valid, tmp_path):
    path = copy(valid, "sparse", tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        name = next(k for k in handle.keys() if k.endswith(".mask"))
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0]
    data[start] ^= 0xFF  # flips 8 keep bits: the mask no longer keeps nnz weights
    (path / "model.safetensors").write_bytes(bytes(data))
    reseal(path)
    refused(path, "nnz")
    run = subprocess.run([*CLI, "inspect", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr


def test_fifos_devices_and_links_to_huge_files_are_refused_without_reading(valid, tmp_path):
    path = copy(valid, "llama", tmp_path)
    (path / "tokenizer.json").unlink()
    os.mkfifo(path / "tokenizer.json")  # opening it would block forever
    refused(path, "not a regular file")
    path = shutil.copytree(valid["llama"], tmp_path / "zero")
    (path / "hypercompress.json").unlink()
    (path / "hypercompress.json").symlink_to("/dev/zero")
    refused(path, "not a regular file")
    path = shutil.copytree(valid["llama"], tmp_path / "huge")
    huge = tmp_path / "huge.bin"
    huge.touch()
    os.truncate(huge, 200 << 30)  # sparse: no disk used; hashing it would take ~20 minutes
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(huge)
    edit_manifest(path, lambda m: m["totals"].__setitem__("safetensors_bytes", 200 << 30))
    refused(path, "model.safetensors")


def test_files_transformers_would_read_must_be_listed(valid, tmp_path):
    path = copy(valid, "llama", tmp_path)
    (path / "special_tokens_map.json").write_text("{}")
    refused(path, "special_tokens_map.json", "not listed")
    (path / "special_tokens_map.json").unlink()
    (path / "README.md").write_text("a model card, as the Hub adds")  # not read by transformers: fine
    artifact.load(path)


def test_a_hostile_config_is_refused(valid, tmp_path):
    for value in (10 ** 9, 0, "x", True):
        path = shutil.copytree(valid["llama"], tmp_path / f"c{value}")
        config = json.loads((path / "config.json").read_text())
        config["base_config"]["num_hidden_layers"] = value
        (path / "config.json").write_text(json.dumps(config))
        reseal(path)
        refused(path)


def test_weights_beyond_float16_are_stored_as_float32_and_counted(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(1e5)  # float16 would store inf
    path = save(model, tmp_path / "wide")
    manifest = json.loads((path / "hypercompress.json").read_text())
    assert manifest["dense_dtypes"] == {"model.norm.weight": "float32"}
    tokens = torch.randint(1, 121, (1, 8), generator=torch.Generator().manual_seed(1))
    reloaded, _ = artifact.load(path, fast=False)
    assert reloaded.model.norm.weight.max().item() == 1e5
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    assert artifact.stored_bytes(model) == (path / "model.safetensors").stat().st_size


def test_non_finite_weights_are_refused_at_save(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(UserError, match="model.norm.weight"):
        save(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_transformers_does_not_read_a_config_linked_to_a_huge_file(valid, tmp_path, name):
    """After import hypercompress, transformers' own config readers are bounded too: a config file
    linked to an 8 GiB sparse file is refused naming it, before a byte is read."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    import hypercompress.storage.hf_integration  # noqa: F401  (what using any Auto class does)

    path = copy(valid, "llama", tmp_path)
    huge = tmp_path / "huge.json"
    huge.touch()
    os.truncate(huge, 8 << 30)
    (path / name).unlink(missing_ok=True)
    (path / name).symlink_to(huge)
    with pytest.raises(UserError, match=rf"{name} is 8,589,934,592 bytes, over the 67,108,864 a config file may hold"):
        if name == "config.json":
            AutoModelForCausalLM.from_pretrained(path)
        else:
            GenerationConfig.from_pretrained(path)


def test_inspect_json_to_a_directory_is_a_one_line_error(valid, tmp_path):
    run = subprocess.run([*CLI, "inspect", str(valid["llama"]),
                          "--json", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr


def test_manifest_fields_that_restate_the_tensors_must_agree(valid, tmp_path):
    """The manifest holds the hashes, so it is not hashed itself: its totals, its module list and every
    layout key are checked against what the tensors and the other modules imply instead."""
    path = copy(valid, "llama", tmp_path)
    edit_manifest(path, lambda m: m["totals"].__setitem__("tensor_bits", m["totals"]["tensor_bits"] + 8), sealed=False)
    refused(path, "tensor_bits")
    path = shutil.copytree(valid["gpt2-embed"], tmp_path / "head")
    edit_manifest(path, lambda m: m["modules"].pop("lm_head"), sealed=False)  # the embedding implies it
    refused(path, "lm_head", "not listed")
    path = shutil.copytree(valid["llama"], tmp_path / "key")
    edit_manifest(path, lambda m: m["modules"][first_quant(m)]["layout"].pop("bias"), sealed=False)
    refused(path, "bias")


def test_an_artifact_asking_to_run_code_is_refused_without_a_prompt(valid, tmp_path):
    path = copy(valid, "llama", tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text("raise SystemExit('evil code ran')\n")
    reseal(path)
    refused(path, "custom code")


@pytest.mark.parametrize("edit", ["format_version", "rms_norm_eps", "max_position_embeddings"])
def test_values_that_only_look_right_are_refused(valid, tmp_path, edit):
    path = copy(valid, "llama", tmp_path)
    if edit == "format_version":  # 1.0 == 1 in Python, but not the format's integer
        edit_manifest(path, lambda m: m.__setitem__("format_version", 1.0), sealed=False)
        refused(path, "format version")
        return
    config = json.loads((path / "config.json").read_text())
    config["base_config"][edit] = float("nan") if edit == "rms_norm_eps" else 0
    (path / "config.json").write_text(json.dumps(config))
    reseal(path)
    refused(path, "not finite" if edit == "rms_norm_eps" else edit)


def test_inspect_prints_paths_and_names_as_they_are(valid, tmp_path):
    path = shutil.copytree(valid["llama"], tmp_path / "m[/x]")  # rich would read "[/x]" as a closing tag
    run = subprocess.run([*CLI, "inspect", str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "m[/x]" in run.stdout, run.stderr


def test_a_source_model_with_a_nan_weight_is_refused_before_compressing():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        apply_recipe(model, Recipe.from_list(RTN))
