"""`export --format compressed-tensors`: transformers (with compressed-tensors) decompresses exactly
the artifact's weights from the file, the config groups follow the recipe, and what the format cannot
hold is refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import ARCHS, MOE, make_model, make_tokenizer
from safetensors import safe_open

import hypercompress
from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.exporters import export
from hypercompress.formats.packing import unpack_codes
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

ATOL = 1e-3  # logits, float32: transformers' dequantize-at-load path multiplies in the scales' float16


def make_artifact(path, stages, calib=None):
    model, tokenizer = make_model("llama"), make_tokenizer()
    params = count_params(model)
    recipe = Recipe.from_list(stages)
    apply_recipe(model, recipe, calib)
    return artifact.save(model, tokenizer, path, recipe=recipe.to_list(), original_params=params)


def load_exported(path, dtype=torch.float32, dequantize=False):
    """transformers' own loader; no key may be missing, unexpected or re-initialized."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    os.environ["TQDM_DISABLE"] = "1"
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():  # "loading attributes (dequantize) will be overwritten": wanted
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                           **extra)
    assert not any(info.values()), info
    return model.eval()


@torch.no_grad()
def logits(model, tokens):
    return model(tokens).logits.float()


@pytest.fixture(scope="module")
def wrong_artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("wrong") / "a",
                         [{"method": "rtn", "bits": 2, "group_size": 64, "symmetric": False}])


# transformers 5.x + compressed-tensors 0.20 cannot build asymmetric pack-quantized layers on the meta
# device (their zero points stay unpacked, so the checkpoint's packed ones mismatch; llm-compressor's
# own files fail the same way): those load with dequantize=True, which decompresses at load time.
CASES = {
    "w4g32-int-zero": ({"bits": 4, "group_size": 32, "symmetric": False}, True, (4, "group", 32)),
    "w4g32-sym": ({"bits": 4, "group_size": 32, "symmetric": True}, False, (4, "group", 32)),
    "w8-row-int-zero": ({"bits": 8, "group_size": -1, "symmetric": False}, True, (8, "channel", None)),
    "w3g32-int-zero": ({"bits": 3, "group_size": 32, "symmetric": False}, True, (4, "group", 32)),
    "w3g32-sym": ({"bits": 3, "group_size": 32, "symmetric": True}, False, (4, "group", 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_decompresses_our_codes(case, tmp_path, tokens, wrong_artifact):
    stage, dequantize, (stored_bits, strategy, group) = CASES[case]
    source = make_artifact(tmp_path / "a", [{"method": "rtn", **stage}])
    report = export(source, "compressed-tensors", tmp_path / "ct")
    assert report["verified_exact"] == 14 and report["ignore"] == ["lm_head"]
    # what the file's readers need is said at export time, exactly when transformers needs the option
    assert any("CompressedTensorsConfig(dequantize=True)" in note for note in report["notes"]) is dequantize

    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    (scheme,) = config["config_groups"].values()
    assert scheme["targets"] == ["Linear"] and scheme["format"] == "pack-quantized"
    weights = scheme["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (stored_bits, strategy, group)
    assert weights["type"] == "int" and weights["symmetric"] is stage["symmetric"]

    # the file holds our codes, shifted to signed: q' = q - 2^(b-1) (read back with their unpacker)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ours, _ = artifact.load(source)
    name = "model.layers.1.mlp.down_proj"
    layer = ours.get_submodule(name)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as file:
        assert file.get_tensor(f"{name}.weight_packed").dtype == torch.int32
        assert (f"{name}.weight_zero_point" in file.keys()) is not stage["symmetric"]
        stored = unpack_from_int32(file.get_tensor(f"{name}.weight_packed"), stored_bits, (64, 128))
    codes = unpack_codes(layer.qweight, layer.bits, 64 * 128).view(64, 128).to(torch.int16)
    codes -= 1 << (layer.bits - 1)
    assert torch.equal(stored.to(torch.int16), codes)

    theirs = load_exported(tmp_path / "ct", dequantize=dequantize)
    got, want = logits(theirs, tokens), logits(ours, tokens)
    assert (got - want).abs().max() <= ATOL
    wrong, _ = artifact.load(wrong_artifact)
    assert (got - logits(wrong, tokens)).abs().max() > 10 * ATOL  # the comparison can fail
    # every decompressed weight is ours to the bit, in the dtype compressed-tensors multiplied in (the
    # model's at run time; the scales' float16 when transformers dequantizes at load)
    for module_name in report_modules(ours):
        weight = theirs.get_submodule(module_name).weight.float()
        layer = ours.get_submodule(module_name)
        assert any(torch.equal(weight, layer.dense_weight(dt).float())
                   for dt in (torch.float32, torch.float16)), module_name


@pytest.mark.parametrize("bits", [3, 4])
def test_symmetric_writes_the_exact_symmetric_form_or_refuses_by_name(bits, tmp_path, tokens):
    """--symmetric: 3-bit asymmetric codes minus their zero points always fit the 4-bit field, so the
    folder is symmetric and plain from_pretrained loads it with the artifact's weights to the bit; random
    4-bit grids put codes up to 15 from their zero points: refused, nothing written, and the note of
    the plain export says which way works."""
    source = make_artifact(tmp_path / "a", [{"method": "rtn", "bits": bits, "group_size": 32, "symmetric": False}])
    plain = export(source, "compressed-tensors", tmp_path / "plain")
    (asymmetric_note,) = [n for n in plain["notes"] if n.startswith("asymmetric grids")]
    assert ("export with --symmetric" in asymmetric_note) is (bits == 3)
    assert ("compress with --set symmetric=true" in asymmetric_note) is (bits == 4)
    if bits == 4:
        with pytest.raises(UserError, match=r"--symmetric: module model\.layers\.0\..*span -?\d+\.\.\d+, outside "
                                            r"the 4-bit signed field \(-8\.\.7\)"):
            export(source, "compressed-tensors", tmp_path / "ct", symmetric=True)
        assert not (tmp_path / "ct").exists()
        return
    report = export(source, "compressed-tensors", tmp_path / "ct", symmetric=True)
    assert report["verified_exact"] == 14 and any(n.startswith("--symmetric: 14 asymmetric") for n in report["notes"])
    (scheme,) = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert scheme["weights"]["symmetric"] is True and scheme["weights"]["num_bits"] == 4
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as file:
        assert not [k for k in file.keys() if k.endswith("weight_zero_point")]
    ours, _ = artifact.load(source)
    theirs = load_exported(tmp_path / "ct")  # no dequantize option: the symmetric folder loads as written
    assert (logits(theirs, tokens) - logits(ours, tokens)).abs().max() <= ATOL
    for module_name in report_modules(ours):  # (decompressed by that forward)
        weight = theirs.get_submodule(module_name).weight.float()
        assert torch.equal(weight, ours.get_submodule(module_name).dense_weight(torch.float32)), module_name


def report_modules(model):
    return [n for n, m in model.named_modules() if getattr(m, "kind", "") == "quant"]


def test_float_zero_is_refused_and_nothing_written(tmp_path):
    source = make_artifact(tmp_path / "a", [{"method": "rtn", "bits": 4, "group_size": 32,
                                             "symmetric": False, "zero_point": "float"}])
    out = tmp_path / "exports" / "ct"
    with pytest.raises(UserError) as error:
        export(source, "compressed-tensors", out)
    message = str(error.value)
    assert "\n" not in message and "quant module" in message and "float zero point" in message
    assert "--format gguf" in message
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []


def test_mixed_bits_make_two_config_groups(tmp_path, tokens):
    stages = [{"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True, "targets": ["mlp"]},
              {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "ignore": ["mlp"]}]
    source = make_artifact(tmp_path / "a", stages)
    report = export(source, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = sorted(config["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert len(groups) == 2 and config["ignore"] == ["lm_head"]
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    attn = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert sorted(groups[0]["targets"]) == sorted(mlp) and sorted(groups[1]["targets"]) == sorted(attn)
    assert (groups[0]["weights"]["num_bits"], groups[0]["weights"]["group_size"]) == (4, 32)
    assert (groups[1]["weights"]["num_bits"], groups[1]["weights"]["strategy"]) == (8, "channel")
    assert sorted(g["our_bits"] for g in report["config_groups"].values()) == [[3], [8]]
    assert not any("vLLM" in note for note in report["notes"])
    assert "3-bit codes stored in 4-bit" in report["notes"][0]
    ours, _ = artifact.load(source)
    assert (logits(load_exported(tmp_path / "ct"), tokens) - logits(ours, tokens)).abs().max() <= ATOL


def test_other_kinds_refused_unless_dense_fallback(tmp_path, tokens):
    stages = [{"method": "svd", "keep": 0.5, "targets": ["mlp"]},
              {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "ignore": ["mlp"]}]
    source = make_artifact(tmp_path / "a", stages)
    with pytest.raises(UserError, match=r"lowrank module model\.layers\.0\.mlp\.\w+ \(and 5 more modules\)"
                                        r".*--format hf.*--dense-fallback"):
        export(source, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    report = export(source, "compressed-tensors", tmp_path / "ct", dense_fallback=True)
    assert len(report["dense_fallback"]) == 6 and report["verified_exact"] == 8
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert sorted(config["ignore"]) == sorted(["lm_head", *(d["module"] for d in report["dense_fallback"])])
    ours, _ = artifact.load(source)
    # the low-rank products are rounded once to float16 in the file: rounding only
    assert (logits(load_exported(tmp_path / "ct"), tokens) - logits(ours, tokens)).abs().max() <= 5 * ATOL


def test_sparse_and_quantized_embedding_refused(tmp_path, tokens):
    sparse = make_artifact(tmp_path / "s", [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}], tokens)
    with pytest.raises(UserError, match=r"sparse module .*no 2:4.*--format hf"):
        export(sparse, "compressed-tensors", tmp_path / "ct")
    embedding = make_artifact(tmp_path / "e", [
        {"method": "rtn", "bits": 4, "group_size": 32, "targets": ["^model\\.embed_tokens$"]},
        {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}])
    with pytest.raises(UserError, match=r"quant_embedding module model\.embed_tokens: .*--format gguf"):
        export(embedding, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    report = export(embedding, "compressed-tensors", tmp_path / "ct", dense_fallback=True)
    assert report["ignore"] == ["lm_head", "model.embed_tokens"] and len(report["config_groups"]) == 1
    ours, _ = artifact.load(embedding)
    assert (logits(load_exported(tmp_path / "ct"), tokens) - logits(ours, tokens)).abs().max() <= 5 * ATOL


def test_split_fused_projections_are_noted(tmp_path):
    """vLLM fuses q/k/v: one of them on another grid loads in transformers but not in vLLM: say so."""
    stages = [{"method": "rtn", "bits": 8, "group_size": 32, "targets": ["q_proj"]},
              {"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["q_proj"]}]
    report = export(make_artifact(tmp_path / "a", stages), "compressed-tensors", tmp_path / "ct")
    assert len(report["config_groups"]) == 2
    assert any("2 differ (e.g. model.layers.0.self_attn.q_proj/k_proj/v_proj)" in n for n in report["notes"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_exports_and_loads_through_transformers(arch, tmp_path, tokens):
    """Symmetric 4-bit groups of 16 (every tiny family's widths divide them): transformers' own
    compressed-tensors loader rebuilds each family (Phi-3's fused projections and Gemma's scaled
    embedding included) with the artifact's logits; GPT-2's Conv1D linears are refused by name."""
    model, tokenizer = make_model(arch), make_tokenizer()
    recipe = Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 16, "symmetric": True}])
    apply_recipe(model, recipe)
    source = artifact.save(model, tokenizer, tmp_path / "a", recipe=recipe.to_list(), original_params=1)
    if arch == "gpt2":
        with pytest.raises(UserError, match="not GPT-2's Conv1D; export it with --format gguf"):
            export(source, "compressed-tensors", tmp_path / "ct")
        return
    if arch in MOE:
        with pytest.raises(UserError, match="does not write a mixture of experts .*: transformers loads no quantized experts.*--format hf"):
            export(source, "compressed-tensors", tmp_path / "ct")
        assert not (tmp_path / "ct").exists()
        return
    export(source, "compressed-tensors", tmp_path / "ct")
    ours, _ = hypercompress.load(source, fast=False)
    theirs = load_exported(tmp_path / "ct")
    expected = logits(ours, tokens)
    assert torch.allclose(logits(theirs, tokens), expected, atol=ATOL * max(1.0, expected.abs().max().item()))
