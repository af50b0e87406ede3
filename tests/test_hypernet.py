"""The Solomonoff hypernetwork: patches, Set Transformer, backbones, generator, method and artifact."""

from __future__ import annotations

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.layers.hypernet.backbone import make_backbone
from hypercompress.layers.hypernet.generator import HyperGenerator
from hypercompress.layers.hypernet.linear import GeneratedLinear
from hypercompress.methods.hypernet.patches import from_patches, to_patches
from hypercompress.methods.hypernet.set_encoder import SetEncoder
from hypercompress.sources.models import load_model
from hypercompress.modules import count_params
from hypercompress.layers import QuantLinear
from hypercompress.recipe import Recipe

FAST = ["warm_steps=5", "steps=5"]


@pytest.mark.parametrize("shape,patch", [((64, 64), 16), ((50, 37), 16), ((3, 200), 7), ((1, 1), 4)])
def test_patch_round_trip_is_exact(shape, patch):
    weight = torch.randn(*shape, dtype=torch.float64)
    tokens, coords, grid = to_patches(weight, patch)
    assert tokens.shape == (grid.row_blocks * grid.col_blocks, patch * patch)
    assert grid.padding == (grid.row_blocks * patch - shape[0], grid.col_blocks * patch - shape[1])
    back = from_patches(tokens, grid)
    assert back.dtype == weight.dtype and torch.equal(back, weight)
    r, c = coords[5 % len(coords)]
    tile = tokens[5 % len(coords)].reshape(patch, patch)
    rows, cols = min(patch, shape[0] - r * patch), min(patch, shape[1] - c * patch)
    assert torch.equal(tile[:rows, :cols], weight[r * patch:r * patch + rows, c * patch:c * patch + cols])


def test_set_encoder_is_permutation_invariant():
    torch.manual_seed(0)
    encoder = SetEncoder(patch_dim=16, out_dim=8).eval()
    tokens, coords = torch.randn(2, 30, 16), torch.rand(2, 30, 2)
    order = torch.randperm(30)
    z = encoder(tokens, coords)
    assert z.shape == (2, 8)
    assert torch.allclose(encoder(tokens[:, order], coords[:, order]), z, atol=1e-5)
    assert not torch.allclose(encoder(tokens.flip(0), coords), z, atol=1e-3)  # it does read the set


@pytest.mark.parametrize("kind", ["gru", "ssm"])
def test_backbones_carry_state_over_depth(kind):
    torch.manual_seed(0)
    backbone = make_backbone(kind, 6, 12)
    x = torch.randn(5, 6)
    out = backbone(x)
    assert out.shape == (5, 12) and torch.isfinite(out).all()
    changed = x.clone()
    changed[0] += 1.0
    later = backbone(changed)
    assert not torch.allclose(later[3], out[3])  # layer 0's input reaches layer 3
    changed = x.clone()
    changed[4] += 1.0
    assert torch.allclose(backbone(changed)[:4], out[:4])  # causal over depth


def test_mamba_backbone_names_its_package():
    pytest.importorskip("torch")
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="mamba-ssm"):
            make_backbone("mamba", 4, 8)


def test_generator_size_does_not_grow_with_the_matrices():
    small = HyperGenerator(4, [[64, 64], [128, 64]], rank=4, d_z=8, d_hidden=16, block=16)
    large = HyperGenerator(4, [[256, 256], [512, 256]], rank=4, d_z=8, d_hidden=16, block=16)
    assert [w.shape for w in large()] == [(4, 256, 256), (4, 512, 256)]
    grow = count_params(large) - count_params(small)
    assert grow == 2 * (512 // 16 - 128 // 16) * 16  # only the block-coordinate embeddings grow


def test_hypernet_learns_and_reloads_exactly(model_dirs, tokens, tmp_path):
    loaded = load_model(str(model_dirs["llama"]))
    model, params = loaded.model, count_params(loaded.model)
    calib = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.single("hypernet").with_overrides(["warm_steps=30", "steps=30", "backbone=ssm"])
    events = []
    apply_recipe(model, recipe, calib, progress=lambda i, label, done, total, note: events.append(note))
    assert any("kl" in e for e in events) and any("warm start" in e for e in events)
    assert all(isinstance(model.get_submodule(f"model.layers.{l}.mlp.up_proj"), GeneratedLinear) for l in (0, 1))
    logits = model(tokens).logits
    path = artifact.save(model, loaded.tokenizer, tmp_path / "a", recipe=recipe.to_list(), original_params=params)
    manifest = artifact.read_manifest(path)
    assert manifest["modules"]["hypernet"]["kind"] == "hypernet"
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(tokens).logits, logits)
    assert reloaded.hypernet.decompress_seconds is not None


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_generator_is_smaller_and_reloads_exactly(model_dirs, tokens, tmp_path, bits):
    loaded = load_model(str(model_dirs["llama"]))
    calib = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for value_bits in (16, bits):
        model = load_model(str(model_dirs["llama"])).model
        recipe = Recipe.single("hypernet").with_overrides(FAST + [f"value_bits={value_bits}"])
        apply_recipe(model, recipe, calib)
        sizes[value_bits] = model.hypernet.storage_bits()
    coded = model.hypernet.coded_parameters()
    assert coded and all(p.dtype == torch.float16 for p in coded.values())
    coded_values = sum(p.numel() for p in coded.values())
    # the coded matrices shrink from 16 bits per value to about `bits` (+ a scale and offset per row)
    assert sizes[16] - sizes[bits] > 0.8 * (16 - bits) * coded_values
    head = coded["head_u.weight"].float()
    assert head.unique(dim=None).numel() <= head.shape[0] * (1 << bits)  # codes, not free values
    logits = model(tokens).logits
    path = artifact.save(model, loaded.tokenizer, tmp_path / "q", recipe=recipe.to_list(),
                         original_params=count_params(loaded.model))
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(tokens).logits, logits)
    again = artifact.save(reloaded, loaded.tokenizer, tmp_path / "q2", recipe=recipe.to_list(),
                          original_params=count_params(loaded.model))
    assert (again / artifact.WEIGHTS).read_bytes() == (path / artifact.WEIGHTS).read_bytes()


def test_diffusion_head_samples_weights_and_reloads_exactly(model_dirs, tokens, tmp_path):
    loaded = load_model(str(model_dirs["llama"]))
    teacher = load_model(str(model_dirs["llama"])).model
    calib = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
    model = loaded.model
    recipe = Recipe.single("hypernet").with_overrides(["head=dit", "warm_steps=120", "steps=0", "dit_steps=3"])
    notes = []
    apply_recipe(model, recipe, calib, progress=lambda i, label, done, total, note: notes.append(note))
    assert any("denoising" in n for n in notes)
    generator = model.hypernet
    assert generator.head == "dit" and not hasattr(generator, "head_u")
    name = "model.layers.0.self_attn.q_proj"
    weight = teacher.get_submodule(name).weight
    made = model.get_submodule(name).dense_weight()
    assert (made - weight).pow(2).mean() < 0.85 * weight.pow(2).mean()  # sampled from noise, yet near W
    logits = model(tokens).logits
    path = artifact.save(model, loaded.tokenizer, tmp_path / "dit", recipe=recipe.to_list(),
                         original_params=count_params(teacher))
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(tokens).logits, logits)  # the seeded sampler is deterministic
    notes.clear()
    distilled = load_model(str(model_dirs["llama"])).model  # distillation differentiates the sampler
    apply_recipe(distilled, Recipe.single("hypernet").with_overrides(["head=dit", "warm_steps=2", "steps=3"]), calib,
             progress=lambda i, label, done, total, note: notes.append(note))
    assert any("kl" in n for n in notes)


def test_residual_mode_keeps_the_base_and_needs_one(model_dirs, tokens, tmp_path):
    loaded = load_model(str(model_dirs["llama"]))
    model, params = loaded.model, count_params(loaded.model)
    calib = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="earlier stage"):
        apply_recipe(load_model(str(model_dirs["llama"])).model,
                 Recipe.single("hypernet").with_overrides(["mode=residual", *FAST]), calib)
    recipe = Recipe.from_list([{"method": "rtn", "bits": 2, "group_size": 32},
                               {"method": "hypernet", "mode": "residual", "warm_steps": 5, "steps": 5}])
    apply_recipe(model, recipe, calib)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, GeneratedLinear) and isinstance(layer.base, QuantLinear)
    logits = model(tokens).logits
    path = artifact.save(model, loaded.tokenizer, tmp_path / "r", recipe=recipe.to_list(), original_params=params)
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(tokens).logits, logits)


def test_bad_hypernet_settings_are_one_line_errors():
    for bad, needle in [("mode=both", "generate or residual"), ("backbone=lstm", "gru"), ("rank=0", "positive")]:
        with pytest.raises(UserError, match=needle):
            Recipe.single("hypernet").with_overrides([bad])


def test_distilling_svd_factors_lowers_kl_and_keeps_the_size(model_dirs, tokens, tmp_path):
    from hypercompress.training.kl import kl_to_teacher

    calib = torch.randint(1, 121, (8, 32), generator=torch.Generator().manual_seed(0))
    teacher = load_model(str(model_dirs["llama"])).model
    plain = load_model(str(model_dirs["llama"])).model
    apply_recipe(plain, Recipe.from_list([{"method": "svd", "rank": 4}]), calib)
    trained = load_model(str(model_dirs["llama"])).model
    apply_recipe(trained, Recipe.from_list([{"method": "svd", "rank": 4},
                                        {"method": "distill", "steps": 40, "lr": 3e-3}]), calib)
    assert artifact.storage_bits(trained) == artifact.storage_bits(plain)
    with torch.no_grad():
        reference = teacher(calib).logits
        assert kl_to_teacher(reference, trained(calib).logits) < 0.8 * kl_to_teacher(reference, plain(calib).logits)
    with pytest.raises(UserError, match="nothing to train"):
        apply_recipe(load_model(str(model_dirs["llama"])).model, Recipe.single("distill"), calib)


def test_cli_hypernet_compress_inspect_evaluate(model_dirs, calib_file, text_file, tmp_path):
    from typer.testing import CliRunner

    from hypercompress.cli import app

    out = tmp_path / "hn"
    run = CliRunner().invoke(app, ["compress", str(model_dirs["gpt2"]), "--method", "hypernet",
                                   "--set", "steps=3", "--set", "warm_steps=3", "--calib", str(calib_file),
                                   "--calib-samples", "4", "--calib-len", "32", "--out", str(out)])
    assert run.exit_code == 0, run.output
    shown = CliRunner().invoke(app, ["inspect", str(out), "--json", str(tmp_path / "i.json")])
    assert shown.exit_code == 0 and "generated_linear" in shown.output
    scored = CliRunner().invoke(app, ["evaluate", str(out), "--data", str(text_file), "--seq-len", "32",
                                      "--max-windows", "2"])
    assert scored.exit_code == 0, scored.output
    missing = CliRunner().invoke(app, ["compress", str(model_dirs["gpt2"]), "--method", "hypernet",
                                       "--set", "backbone=mamba", "--calib", str(calib_file), "--calib-samples",
                                       "4", "--calib-len", "32", "--out", str(tmp_path / "m")])
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        assert missing.exit_code == 2 and "mamba-ssm" in missing.stderr
        assert not (tmp_path / "m").exists()
