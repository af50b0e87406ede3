"""The layer-wise runner: block inputs, error propagation, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch

from hypercompress import artifact
from hypercompress.api import compress
from hypercompress.calibration import capture_block_inputs
from hypercompress.errors import UserError
from hypercompress.models import load_model
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from conftest import ARCHS

RECIPE = [{"method": "gptq", "bits": 3, "group_size": 32, "targets": ["mlp"]},
          {"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"attn\.(q|k)_proj"]},
          {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
           "targets": [r"attn\.(v|o)_proj"]}]


def calib():
    return torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_block_inputs_reproduce_the_model(arch, model_dirs):
    """Running the captured inputs through every block gives the model's last hidden state."""
    model = load_model(str(model_dirs[arch])).model
    samples = calib()
    hiddens, calls = capture_block_inputs(model, samples, batch_size=4)
    assert [h.shape[0] for h in hiddens] == [4, 2]
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    hidden = hiddens[0]
    with torch.no_grad():
        for index, block in enumerate(blocks):
            hidden = calls.run(block, index, 0, hidden)
        expected = model(samples[:4], output_hidden_states=True).hidden_states[-1]
    norm = model.model.norm if arch == "llama" else model.transformer.ln_f
    assert torch.allclose(norm(hidden), expected, atol=1e-5)


def save(model_dir, out, interrupt_after=None, resume=False):
    loaded = load_model(str(model_dir))
    params = count_params(loaded.model)
    recipe = Recipe.from_list(RECIPE)

    def progress(stage, method, done, total):
        if interrupt_after is not None and (stage, done) == interrupt_after:
            raise KeyboardInterrupt

    compress(loaded.model, recipe, calib(), progress, batch_size=4,
             checkpoint_dir=out.with_name(out.name + ".ckpt"), resume=resume)
    return artifact.save(loaded.model, loaded.tokenizer, out, recipe=recipe.to_list(),
                         original_params=params)


@pytest.mark.parametrize("interrupt_after", [(0, 1), (2, 1)])
def test_resume_after_a_kill_gives_a_byte_identical_artifact(interrupt_after, model_dirs, tmp_path):
    reference = save(model_dirs["llama"], tmp_path / "reference")
    assert not (tmp_path / "reference.ckpt").exists()  # removed once the run completes
    with pytest.raises(KeyboardInterrupt):
        save(model_dirs["llama"], tmp_path / "resumed", interrupt_after=interrupt_after)
    assert (tmp_path / "resumed.ckpt" / "state.json").is_file()
    resumed = save(model_dirs["llama"], tmp_path / "resumed", resume=True)
    for file in sorted(reference.iterdir()):
        assert file.read_bytes() == (resumed / file.name).read_bytes(), file.name


def test_checkpoint_of_another_run_is_refused(model_dirs, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        save(model_dirs["llama"], tmp_path / "run", interrupt_after=(0, 1))
    loaded = load_model(str(model_dirs["llama"]))
    other = Recipe.from_list([{"method": "gptq", "bits": 2, "group_size": 32}])
    with pytest.raises(UserError, match="another model, recipe or calibration"):
        compress(loaded.model, other, calib(), checkpoint_dir=tmp_path / "run.ckpt", resume=True)


def test_calibrated_method_without_data_is_refused(model_dirs):
    loaded = load_model(str(model_dirs["gpt2"]))
    with pytest.raises(UserError, match="needs calibration data"):
        compress(loaded.model, Recipe.single("gptq"))


def test_gptq_beats_rtn_on_the_tiny_model(model_dirs):
    """Same bits and groups: GPTQ's outputs stay closer to the dense model's than RTN's."""
    samples = calib()
    errors = {}
    for method in ("rtn", "gptq"):
        dense = load_model(str(model_dirs["llama"])).model
        student = load_model(str(model_dirs["llama"])).model
        compress(student, Recipe.from_list([{"method": method, "bits": 2, "group_size": 32}]),
                 samples, batch_size=6)
        with torch.no_grad():
            errors[method] = (student(samples).logits - dense(samples).logits).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]
