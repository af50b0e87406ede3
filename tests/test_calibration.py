"""The layer-wise runner: block inputs, error propagation, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.arch import arch_of
from hypercompress.block_calls import capture_block_inputs
from hypercompress.layerwise import run_layerwise
from hypercompress.errors import UserError
from hypercompress.methods.base import LayerwiseMethod
from hypercompress.sources.models import load_model
from hypercompress.modules import count_params
from hypercompress.planning.sensitivity import TailRunner
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
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    hidden = hiddens[0]
    with torch.no_grad():
        for index, block in enumerate(blocks):
            hidden = calls.run(block, index, 0, hidden)
        expected = model(samples[:4], output_hidden_states=True).hidden_states[-1]
    norm = model.get_submodule(spec.final_norm)
    assert torch.allclose(norm(hidden), expected, atol=1e-5)


def save(model_dir, out, interrupt_after=None, resume=False):
    loaded = load_model(str(model_dir))
    params = count_params(loaded.model)
    recipe = Recipe.from_list(RECIPE)

    def progress(stage, method, done, total):
        if interrupt_after is not None and (stage, done) == interrupt_after:
            raise KeyboardInterrupt

    apply_recipe(loaded.model, recipe, calib(), progress, batch_size=4,
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
        apply_recipe(loaded.model, other, calib(), checkpoint_dir=tmp_path / "run.ckpt", resume=True)


def test_calibrated_method_without_data_is_refused(model_dirs):
    loaded = load_model(str(model_dirs["gpt2"]))
    with pytest.raises(UserError, match="needs calibration data"):
        apply_recipe(loaded.model, Recipe.single("gptq"))


def test_gptq_beats_rtn_on_the_tiny_model(model_dirs):
    """Same bits and groups: GPTQ's outputs stay closer to the dense model's than RTN's."""
    samples = calib()
    errors = {}
    for method in ("rtn", "gptq"):
        dense = load_model(str(model_dirs["llama"])).model
        student = load_model(str(model_dirs["llama"])).model
        apply_recipe(student, Recipe.from_list([{"method": method, "bits": 2, "group_size": 32}]),
                 samples, batch_size=6)
        with torch.no_grad():
            errors[method] = (student(samples).logits - dense(samples).logits).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]


class _Record(LayerwiseMethod):
    """Records each layer's first calibration input; keeps the layer as it is."""

    needs_calibration = True

    def __init__(self):
        super().__init__(None)
        self.seen = {}

    def observe(self, name, x):
        self.seen.setdefault(name, x.detach().clone())

    def compress(self, name, layer):
        return layer


def _mixed_attention_models():
    """Models whose blocks take different masks or take them positionally: Qwen2 with a sliding
    window on block 1 (config.layer_types), GPT-2 with eager attention (its mask is positional)."""
    torch.manual_seed(0)
    qwen = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                       sliding_window=8, max_window_layers=1)
    assert qwen.layer_types == ["full_attention", "sliding_attention"]
    gpt2 = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return {"qwen2-sliding": (AutoModelForCausalLM.from_config(qwen).eval(),
                              "model.layers.1.self_attn.o_proj"),
            "gpt2-eager": (AutoModelForCausalLM.from_config(gpt2, attn_implementation="eager").eval(),
                           "transformer.h.1.attn.c_proj")}


@pytest.mark.parametrize("kind", ["qwen2-sliding", "gpt2-eager"])
def test_each_block_gets_its_own_mask(kind):
    """The runner feeds block 1 exactly what the model does (its own layer type's mask)."""
    model, name = _mixed_attention_models()[kind]
    ids = calib()[:, :24]
    seen = {}
    layer = model.get_submodule(name)
    handle = layer.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    record = _Record()
    run_layerwise(model, record, [name], ids, batch_size=6)
    assert torch.allclose(record.seen[name], seen["x"], atol=1e-5)


def test_planner_pass_uses_each_blocks_mask():
    """The sensitivity pass's reference log-probs (cached block inputs) equal the model's own."""
    model, _ = _mixed_attention_models()["qwen2-sliding"]
    ids = calib()[:, :24]
    runner = TailRunner(model, ids, batch=6)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    assert torch.allclose(runner.reference[0], expected, atol=1e-5)


def test_a_model_that_skips_a_block_is_refused(model_dirs):
    model = load_model(str(model_dirs["llama"])).model
    model.config.num_hidden_layers = 1  # LlamaModel then runs block 0 only
    with pytest.raises(UserError, match="cannot be calibrated layer by layer"):
        capture_block_inputs(model, calib(), batch_size=4)
