"""Distillation recovery beyond low-rank factors: quantization scales, LoRA adapters on compressed
layers (stored and counted), ReLoRA merges into the quantized base, Adafactor, teacher-written data,
optimizer state in checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.training.kl import kl_to_teacher
from hypercompress.errors import UserError
from hypercompress.layers import LoRALinear
from hypercompress.modules import count_params, effective_weights
from hypercompress.recipe import Recipe

from conftest import make_model, make_tokenizer

CALIB = torch.randint(1, 121, (8, 32), generator=torch.Generator().manual_seed(0))
RTN = {"method": "rtn", "bits": 2, "group_size": 32}


def kl(model) -> float:
    with torch.no_grad():
        return kl_to_teacher(make_model("llama")(CALIB).logits, model(CALIB).logits).item()


def recovered(**config):
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([RTN, {"method": "distill", "steps": 30, "lr": 3e-3, **config}]), CALIB)
    return model


@pytest.fixture(scope="module")
def quantized():
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([RTN]), CALIB)
    return model


def test_training_scales_lowers_kl_and_keeps_codes_and_size(quantized):
    model = recovered(train_norms=False)
    assert kl(model) < 0.9 * kl(quantized)
    assert artifact.storage_bits(model) == artifact.storage_bits(quantized)
    layer, before = model.model.layers[0].mlp.up_proj, quantized.model.layers[0].mlp.up_proj
    assert torch.equal(layer.qweight, before.qweight) and not torch.equal(layer.scales, before.scales)
    assert layer.scales.dtype == torch.float16 and "scales" in layer._buffers


@pytest.mark.parametrize("stage, trained, gain", [
    ({"method": "factor_embedding", "rank": 8, "bits": 4}, ["up", "scale", "offset"], 0.9),
    ({"method": "factor_embedding", "rank": 8, "bits": 16}, ["up", "table"], 0.9),
    ({"method": "rtn", "bits": 2, "group_size": -1}, ["scales"], 1.0),  # one scale per row: little to gain
])
def test_the_compressed_embedding_trains_and_its_artifact_reloads(stage, trained, gain, tmp_path):
    stages = [{**stage, "targets": [r"^model\.embed_tokens$"]}]
    before = make_model("llama")
    apply_recipe(before, Recipe.from_list(stages), CALIB)
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list(stages + [{"method": "distill", "steps": 30, "lr": 3e-3,
                                                 "train_norms": False}]), CALIB)
    assert kl(model) < gain * kl(before)
    assert artifact.storage_bits(model) == artifact.storage_bits(before)
    embedding, old = model.model.embed_tokens, before.model.embed_tokens
    assert all(not torch.equal(getattr(embedding, k), getattr(old, k)) for k in trained)
    assert all(torch.equal(getattr(embedding, k), getattr(old, k)) for k in ("codes", "qweight") if hasattr(old, k))
    path = artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=[], original_params=count_params(before))
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(CALIB).logits, model(CALIB).logits)


def test_lora_adapters_are_stored_counted_and_reload(quantized, tmp_path):
    model = recovered(lora_rank=4, train_scales=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, LoRALinear)
    assert kl(model) < 0.9 * kl(quantized)
    extra = sum(m.A.numel() + m.B.numel() for m in model.modules() if isinstance(m, LoRALinear)) * 16
    assert artifact.storage_bits(model) == artifact.storage_bits(quantized) + extra
    assert effective_weights(model) == effective_weights(quantized) == count_params(make_model("llama"))
    path = artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=[], original_params=count_params(make_model("llama")))
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(CALIB).logits, model(CALIB).logits)


def test_merge_folds_the_adapter_into_the_quantized_codes():
    base = make_model("llama")
    apply_recipe(base, Recipe.from_list([RTN]), CALIB)
    layer = base.model.layers[0].mlp.up_proj
    adapter = LoRALinear.wrap(layer, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.B.copy_(torch.randn(adapter.B.shape) * 0.5)
    codes, old = layer.qweight.clone(), layer.dense_weight()
    target = adapter.dense_weight()
    adapter.merge_into_base()
    assert not torch.equal(layer.qweight, codes) and adapter.B.abs().sum() == 0
    # each weight moves to the grid point nearest W + B A: never farther than it was
    new_error, old_error = (layer.dense_weight() - target).abs(), (old - target).abs()
    assert (new_error <= old_error + 1e-6).all() and new_error.mean() < 0.8 * old_error.mean()


def test_relora_runs_and_adafactor_and_teacher_data_train(quantized):
    assert kl(recovered(lora_rank=4, relora_every=10)) < kl(quantized)
    assert kl(recovered(optimizer="adafactor")) < kl(quantized)
    assert kl(recovered(data="teacher")) < kl(quantized)


@pytest.mark.parametrize("config, message", [
    ({"relora_every": 5}, "needs lora_rank"), ({"optimizer": "sgd"}, "adamw or adafactor"),
    ({"data": "web"}, "calib or teacher"),
])
def test_bad_distill_settings_are_refused(config, message):
    with pytest.raises(UserError, match=message):
        Recipe.from_list([{"method": "distill", **config}])


def test_nothing_to_train_is_refused():
    with pytest.raises(UserError, match="nothing to train"):
        apply_recipe(make_model("llama"), Recipe.single("distill"), CALIB)


def test_adafactor_state_survives_a_checkpoint(tmp_path):
    from hypercompress.training.distill import DistillSettings, distill

    student, teacher = make_model("llama"), make_model("llama")
    apply_recipe(student, Recipe.from_list([{"method": "svd", "rank": 4}]), CALIB)
    layer = student.model.layers[0].mlp.up_proj
    params = {"U": torch.nn.Parameter(layer.U.float())}
    del layer._buffers["U"]
    layer.register_parameter("U", params["U"])
    settings = DistillSettings(4, 2, 1e-3, optimizer="adafactor", checkpoint_every=2)
    distill(student, teacher, CALIB, params, lambda: None, settings, checkpoint_dir=tmp_path)
    from safetensors.torch import load_file
    saved = tmp_path / json.loads((tmp_path / "state.json").read_text())["file"]
    assert any(k.startswith("state.") for k in load_file(str(saved)))
