"""Artifact format: exact byte accounting, integrity checks, memory, generation, ties."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.storage.inspection import inspect as inspect_artifact
from hypercompress.errors import UserError
from hypercompress.layers import QuantLinear
from hypercompress.sources.models import load_model
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe


@pytest.fixture(scope="module")
def saved(model_dirs, tmp_path_factory):
    """A GPT-2 (tied embeddings, Conv1D) with RTN 3-bit on its MLP and SVD on attention."""
    loaded = load_model(str(model_dirs["gpt2"]))
    params = count_params(loaded.model)
    recipe = Recipe.from_list([
        {"method": "rtn", "bits": 3, "group_size": 32, "targets": [r"mlp\."]},
        {"method": "svd", "keep": 0.4, "targets": [r"attn\."]},
    ])
    apply_recipe(loaded.model, recipe)
    path = tmp_path_factory.mktemp("art") / "gpt2-mixed"
    artifact.save(loaded.model, loaded.tokenizer, path, recipe=recipe.to_list(), original_params=params)
    return path, loaded.model, params


def test_bits_accounting_matches_the_file_on_disk(saved):
    """The tensor count equals the file's data section exactly; the rest is the JSON header
    (a few % of a tiny model's file, under 0.1% of SmolLM2's: the slow test checks the 1%)."""
    path, model, params = saved
    raw = (path / artifact.WEIGHTS).read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert artifact.storage_bits(model) == (len(raw) - header) * 8
    on_disk = len(raw) * 8
    summary = inspect_artifact(path)
    assert summary["params"] == params
    assert summary["bits_per_weight"] * params / 8 == pytest.approx(on_disk / 8, rel=0.01)
    assert sum(m["bits"] for m in summary["modules"]) == summary["tensor_bits"]


def test_tied_weights_are_stored_once_and_stay_tied(saved):
    path, _, _ = saved
    manifest = json.loads((path / artifact.MANIFEST).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    model, _ = artifact.load(path)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loaded_model_keeps_only_compressed_tensors(saved):
    path, _, _ = saved
    model, _ = artifact.load(path)
    mlp = model.transformer.h[0].mlp.c_fc
    assert isinstance(mlp, QuantLinear)
    assert not any(t.is_floating_point() and t.dtype == torch.float32 and t.numel() == 64 * 256
                   for t in mlp.state_dict().values())
    assert mlp.qweight.dtype == torch.uint8


def test_loaded_model_generates(saved):
    path, _, _ = saved
    model, tokenizer = artifact.load(path)
    ids = tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 5)


def test_bfloat16_load_keeps_codes_and_casts_dense_tensors(saved, tokens):
    path, _, _ = saved
    model, _ = artifact.load(path, dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].mlp.c_fc.scales.dtype == torch.float16
    assert torch.isfinite(model(tokens).logits.float()).all()


def test_tampered_weights_are_refused(saved, tmp_path):
    path, _, _ = saved
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for file in path.iterdir():
        (copy_dir / file.name).write_bytes(file.read_bytes())
    data = bytearray((copy_dir / artifact.WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (copy_dir / artifact.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        artifact.load(copy_dir)


def test_existing_output_is_refused_and_nothing_half_written(saved, tmp_path):
    path, model, params = saved
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        artifact.save(model, None, target, recipe=[], original_params=params)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_failed_save_leaves_no_partial_directory(saved, tmp_path):
    _, model, params = saved

    class BrokenTokenizer:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError):
        artifact.save(model, BrokenTokenizer(), tmp_path / "out", recipe=[], original_params=params)
    assert list(tmp_path.iterdir()) == []


def test_untouched_model_round_trips_at_16_bits(model_dirs, tokens, tmp_path):
    loaded = load_model(str(model_dirs["llama"]))
    params = count_params(loaded.model)
    path = artifact.save(loaded.model, loaded.tokenizer, tmp_path / "plain", recipe=[],
                         original_params=params)
    summary = inspect_artifact(path)
    assert summary["tensor_bits"] == 16 * params  # + the header: 16.19 bpw on disk at this size
    assert 16 < summary["bits_per_weight"] < 16.5
    reloaded, _ = artifact.load(path)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, nn.Linear)
    expected = loaded.model.half().float()(tokens).logits
    assert torch.allclose(reloaded(tokens).logits, expected, atol=1e-5)
