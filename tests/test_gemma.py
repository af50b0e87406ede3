"""Gemma 2 / 3: the scaled embedding keeps its scale through every embedding kind (and a reload),
the soft-capped logits are what distillation and the planner compare (the GGUF refusal:
test_export_gguf.py)."""

from __future__ import annotations

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.sources.models import load_model
from hypercompress.modules import carry_embedding_scale, head_logits
from hypercompress.recipe import Recipe
from hypercompress.training.distill import _kl_sum
from hypercompress.training.kl import kl_to_teacher
from hypercompress.workflow import compress as compress_source

from conftest import make_model, make_tokenizer

CALIB = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
EMBEDDING = ["embed_tokens$"]


def kl(original, model) -> float:
    with torch.no_grad():
        return kl_to_teacher(original(CALIB).logits, model(CALIB).logits).item()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
@pytest.mark.parametrize("stages", [
    [{"method": "rtn", "bits": 8, "group_size": 16, "targets": EMBEDDING}],
    [{"method": "factor_embedding", "rank": 40, "bits": 16, "targets": EMBEDDING}],
    [{"method": "rtn", "bits": 8, "group_size": 16, "targets": EMBEDDING},
     {"method": "qat", "block_steps": 0, "steps": 2, "batch": 2, "lr": 1e-6, "teacher_fraction": 0}],
])
def test_a_compressed_embedding_keeps_the_scale(arch, stages, tmp_path):
    original, model = make_model(arch), make_model(arch)
    assert float(original.model.embed_tokens.embed_scale) == 8.0  # sqrt(64)
    apply_recipe(model, Recipe.from_list(stages), CALIB)
    embedding = model.model.embed_tokens
    assert embedding.output_scale == 8.0
    with torch.no_grad():
        rows = original.model.embed_tokens(CALIB)
        error = ((embedding(CALIB) - rows).norm() / rows.norm()).item()
    if stages[0]["method"] == "rtn":  # 8-bit rows: the original's, scale included (without it: 0.875)
        assert error < 0.01 and kl(original, model) < 1e-3
    else:  # rank 40 of 64 keeps most of a random table
        assert error < 0.7
    artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=stages, original_params=1)
    reloaded, _ = artifact.load(tmp_path / "a", fast=False)
    assert torch.equal(reloaded(CALIB).logits, model(CALIB).logits)


def test_an_embedding_that_computes_more_than_a_lookup_is_not_replaced_blindly():
    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    with pytest.raises(UserError, match="Shifted computes more than a table lookup"):
        carry_embedding_scale(Shifted(4, 2), torch.nn.Identity())
    scaled = make_model("gemma2").model.embed_tokens
    with pytest.raises(UserError, match="scales its rows by 8 and Identity cannot"):
        carry_embedding_scale(scaled, torch.nn.Identity())


def test_distillation_and_the_planner_compare_soft_capped_logits():
    model = make_model("gemma2")
    with torch.no_grad():
        out = model.model(input_ids=CALIB, output_hidden_states=True)
        capped = head_logits(model, out.last_hidden_state)
        assert torch.allclose(capped, model(CALIB).logits, atol=1e-5)
        assert capped.abs().max() <= 3.0  # the tiny model's cap
        other = make_model("gemma2")
        other.model.norm.weight.add_(0.5)
        theirs = other.model(input_ids=CALIB, output_hidden_states=True)
        summed = _kl_sum(other, model, theirs, out, torch.float32) / CALIB.shape[0]
        expected = kl_to_teacher(model(CALIB).logits[:, :-1], other(CALIB).logits[:, :-1])
    assert torch.allclose(summed, expected, atol=1e-5)


def test_a_size_target_plans_and_loads_on_gemma(tmp_path, model_dirs, calib_file):
    result = compress_source(str(model_dirs["gemma2"]), None, calib_file, target_bpw=6.0, calib_len=32,
                             calib_samples=8, out=tmp_path / "a")
    loaded, _ = artifact.load(tmp_path / "a", fast=False)
    original = load_model(str(model_dirs["gemma2"])).model
    assert result.summary["bits_per_weight"] <= 6.0 * 1.02
    assert kl(original, loaded) < 0.5

