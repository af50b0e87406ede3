"""qat: the fake-quantized form agrees with the stored codes, training lowers the loss, the trained
model is stored exactly as it computed, a rotation before it gives the teacher in the same basis."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hypercompress.apply import apply_recipe
from hypercompress.training.kl import kl_to_teacher
from hypercompress.errors import UserError
from hypercompress.layers import QuantLinear
from hypercompress.layers.quant_embedding import QuantEmbedding, TiedHead
from hypercompress.methods.qat import block_ap as block_ap_module
from hypercompress.methods.qat.fake_quant import FakeQuantLinear
from hypercompress.methods.qat.method import Qat, QatConfig, block_windows, training_data
from hypercompress.methods.rtn import RTN, RtnConfig
from hypercompress.recipe import Recipe

from conftest import make_model, tied_llama


def calib(n=8, length=32, seed=0):
    return torch.randint(1, 121, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric,zero_point", [(False, "int"), (True, "int"), (False, "float")])
def test_untrained_fake_quant_is_rtn_and_stores_as_it_computes(symmetric, zero_point):
    torch.manual_seed(0)
    layer = nn.Linear(64, 24, bias=True)
    rtn = RTN(RtnConfig(bits=3, group_size=32, symmetric=symmetric, zero_point=zero_point)).compress("x", layer)
    fake = FakeQuantLinear.from_dense(layer, 3, 32, symmetric, zero_point)
    stored = fake.to_stored()
    assert torch.equal(stored.dense_weight(), rtn.dense_weight())
    assert torch.allclose(fake.quantized_weight(), stored.dense_weight(), atol=1e-6)
    again = FakeQuantLinear.from_stored(stored).to_stored()  # an earlier stage's codes, taken as they are
    for key, value in stored.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_gradients_reach_weights_and_scales_through_the_rounding():
    torch.manual_seed(0)
    fake = FakeQuantLinear.from_dense(nn.Linear(64, 8), 2, 32)
    fake(torch.randn(5, 64)).pow(2).sum().backward()
    assert fake.weight.grad.abs().sum() > 0 and fake.scales.grad.abs().sum() > 0
    assert torch.isfinite(fake.weight.grad).all() and torch.isfinite(fake.scales.grad).all()


def test_training_lowers_the_kl_below_rtn_on_text_it_did_not_see():
    model = make_model("llama")
    test = calib(4, 32, seed=5)
    reference = model(test).logits
    rtn = copy.deepcopy(model)
    apply_recipe(rtn, Recipe.from_list([{"method": "rtn", "bits": 2, "group_size": 32}]))
    trained = copy.deepcopy(model)
    apply_recipe(trained, Recipe.from_list([{"method": "qat", "bits": 2, "group_size": 32, "block_steps": 40,
                                         "steps": 40, "lr": 1e-3, "block_lr": 1e-3, "teacher_fraction": 0}]),
             calib(16))
    before, after = (kl_to_teacher(reference, m(test).logits).item() for m in (rtn, trained))
    assert after < 0.8 * before, (before, after)
    assert all(isinstance(trained.get_submodule(f"model.layers.0.{n}"), QuantLinear)
               for n in ("self_attn.q_proj", "mlp.down_proj"))


def test_the_stored_model_computes_what_the_trained_one_did():
    model = tied_llama(128)
    method = Qat(QatConfig(bits=3, group_size=32, embedding_bits=4, block_steps=0, steps=3, lr=1e-3))
    fakes = method._fake_quantize(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                                          and "layers" in n])
    method._end_to_end(model, tied_llama(128), calib(), None, fakes, "cpu", None, False, None)
    ids = calib(2, 16, seed=3)
    with torch.no_grad():
        trained = model(ids).logits
    method._store(model, fakes)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedHead)  # the tie (one stored table) is kept
    assert torch.allclose(model(ids).logits, trained, atol=1e-4)


def test_after_a_rotation_the_teacher_is_the_rotated_model(monkeypatch):
    """Block-AP compares hidden states: they must be in the student's (rotated) basis."""
    seen = {}

    def spy(student, teacher, windows, fakes, **kwargs):
        seen["gap"] = max((student.get_submodule(n.rpartition(".")[0] + ".q_proj").quantized_weight()
                           - teacher.get_submodule(n.rpartition(".")[0] + ".q_proj").weight).abs().max().item()
                          for n in fakes if n.endswith("q_proj"))
        return []

    monkeypatch.setattr("hypercompress.methods.qat.method.block_ap", spy)
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([{"method": "rotate"},
                                      {"method": "qat", "bits": 8, "group_size": 32, "block_steps": 1, "steps": 0,
                                       "teacher_fraction": 0}]), calib())
    assert seen["gap"] < 0.02  # an 8-bit grid of the same (rotated) weights; unrotated they differ by ~0.2


def test_the_training_data_holds_the_corpus_the_teacher_writes(tmp_path):
    teacher = make_model("llama")
    config = QatConfig(teacher_fraction=0.5, corpus_tokens=10 * 24, corpus_cache=str(tmp_path))
    windows, mix = training_data(teacher, calib(6, 24), config, "cpu")
    assert windows.shape == (16, 24) and mix == (6, 0.5)
    assert torch.equal(windows[:6], calib(6, 24))
    assert len(list(tmp_path.glob("corpus-*.safetensors"))) == 1  # cached for the next run
    again, _ = training_data(teacher, calib(6, 24), config, "cpu")
    assert torch.equal(again, windows)
    picked = block_windows(windows, mix, 4, seed=0)
    assert picked.shape == (4, 24)
    plain, none = training_data(teacher, calib(6, 24), QatConfig(teacher_fraction=0), "cpu")
    assert none is None and torch.equal(plain, calib(6, 24))


@pytest.mark.parametrize("values,needle", [({"bits": 1}, "bits"), ({"block_steps": 0, "steps": 0}, "nothing"),
                                           ({"teacher_fraction": 1.0}, "teacher_fraction"),
                                           ({"bits": 8, "group_size": 2}, "group_size"), ({"lr": 0}, "lr")])
def test_bad_settings_are_refused_by_name(values, needle):
    with pytest.raises(UserError, match=needle):
        QatConfig.from_dict(values)


def test_a_corrupt_block_checkpoint_is_refused_with_the_fix(tmp_path):
    model = make_model("llama")
    fakes = Qat(QatConfig(bits=4, group_size=32))._fake_quantize(model, ["model.layers.0.self_attn.q_proj"])
    block_ap_module._save(tmp_path, 0, fakes)
    file = next(tmp_path.glob("block-0-*.safetensors"))
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit inside a tensor: same header, same size
    file.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256.*remove"):
        block_ap_module._restore(tmp_path, model.model.layers, fakes, "model.layers")


@pytest.mark.parametrize("caller", [True, False])
def test_the_matmul_precision_is_the_caller_s_again_afterwards(monkeypatch, caller):
    """TF32 is a training-only setting (on CUDA): off on the CPU, and the caller's flag comes back."""
    seen = []

    def spy(student, teacher, windows, fakes, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return []

    monkeypatch.setattr("hypercompress.methods.qat.method.block_ap", spy)
    before = torch.backends.cuda.matmul.allow_tf32  # a computed flag (monkeypatch cannot restore it)
    torch.backends.cuda.matmul.allow_tf32 = caller
    try:
        apply_recipe(make_model("llama"), Recipe.from_list([{"method": "qat", "bits": 4, "group_size": 32,
                                                         "block_steps": 1, "steps": 0, "teacher_fraction": 0}]),
                 calib())
        assert seen == [False]  # trained on the CPU: no TF32
        assert torch.backends.cuda.matmul.allow_tf32 is caller
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
