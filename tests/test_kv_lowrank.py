"""Joint low-rank K/V with a latent cache: exact at full rank, the cache really shrinks, incremental
decoding equals the full forward, whitening beats plain SVD on calibration outputs, artifacts reload."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.layers.latent_kv import kv_cache_bytes_per_token
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from conftest import make_model, make_tokenizer

CALIB = torch.randint(1, 121, (6, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def scaled_head_norms(arch):
    """Qwen3 (2 key/value heads of 32; per-head q/k norms) or OLMo-2 (q/k norms over all heads) whose
    q/k norms scale: the latent path must apply them as the model's attention does."""
    model = make_model(arch)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                parameter.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


BUILD = {"llama": lambda: make_model("llama"),  # 2 key/value heads of 16: 32 keys + 32 values per token and layer
         "qwen3": lambda: scaled_head_norms("qwen3"), "olmo2": lambda: scaled_head_norms("olmo2")}


def latent(arch="llama", **config):
    model = BUILD[arch]()
    apply_recipe(model, Recipe.from_list([{"method": "kv_lowrank", **config}]), CALIB)
    return model


@pytest.mark.parametrize("arch, rank", [("llama", 64), ("qwen3", 64), ("olmo2", 64)])  # min(keys + values, width): nothing dropped
def test_full_rank_reproduces_the_dense_model(arch, rank):
    dense, model = BUILD[arch](), latent(arch, rank=rank)
    torch.testing.assert_close(model(IDS).logits, dense(IDS).logits, atol=2e-3, rtol=1e-3)
    prompt = IDS[:1, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       dense.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "olmo2"])
def test_incremental_decoding_equals_the_full_forward(arch):
    model = latent(arch, keep=0.25)
    cache = DynamicCache(config=model.config)
    first = model(IDS[:, :12], past_key_values=cache, use_cache=True).logits
    rest = model(IDS[:, 12:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_cache_and_weights_shrink():
    dense, model = make_model("llama"), latent(keep=0.25)  # r = 16
    assert kv_cache_bytes_per_token(dense) == 2 * 64 * 4  # layers x (32 key + 32 value values) x float32
    assert kv_cache_bytes_per_token(model) == 2 * (16 + 1) * 4  # latent + its position per layer
    assert artifact.storage_bits(model) < artifact.storage_bits(dense)


def kv_output_error(model, dense) -> float:
    error = []
    for block, reference in zip(model.model.layers, dense.model.layers):
        captured = {}
        handle = reference.self_attn.k_proj.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
        dense(CALIB)
        handle.remove()
        x = captured["x"]
        for mine, theirs in ((block.self_attn.k_proj, reference.self_attn.k_proj),
                             (block.self_attn.v_proj, reference.self_attn.v_proj)):
            error.append((mine(x) - theirs(x)).pow(2).sum().item())
    return sum(error)


def test_whitening_lowers_the_output_error_on_calibration_inputs():
    dense = make_model("llama")
    whitened, plain = latent(keep=0.25, whiten=True), latent(keep=0.25, whiten=False)
    assert kv_output_error(whitened, dense) < kv_output_error(plain, dense)


def test_artifact_reloads_with_the_latent_cache(tmp_path):
    model = latent(keep=0.5)
    recipe = [{"method": "kv_lowrank", "keep": 0.5}]
    path = artifact.save(model, make_tokenizer(), tmp_path / "a", recipe=recipe,
                         original_params=count_params(make_model("llama")))
    reloaded, _ = artifact.load(path)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    assert kv_cache_bytes_per_token(reloaded) == kv_cache_bytes_per_token(model)


def test_a_family_whose_attention_the_latent_cache_does_not_reproduce_is_refused():
    with pytest.raises(UserError, match="phi's attention .*RoPE over part of each head"):
        apply_recipe(make_model("phi"), Recipe.from_list([{"method": "kv_lowrank"}]), CALIB)


def test_fused_or_compressed_projections_are_refused():
    with pytest.raises(UserError, match="fuses"):
        apply_recipe(make_model("gpt2"), Recipe.from_list([{"method": "kv_lowrank"}]), CALIB)
    with pytest.raises(UserError, match="before stages"):
        apply_recipe(make_model("llama"), Recipe.from_list([{"method": "rtn", "bits": 4},
                                                        {"method": "kv_lowrank"}]), CALIB)


def test_compress_reports_the_kv_cache_per_token_before_and_after(model_dirs, calib_file, tmp_path):
    import json

    from test_cli import run

    result = run("compress", model_dirs["llama"], "--method", "kv_lowrank", "--set", "keep=0.5", "--calib",
                 calib_file, "--calib-samples", 2, "--calib-len", 32, "--out", tmp_path / "kv")
    assert result.exit_code == 0, result.output
    kv = json.loads((tmp_path / "kv" / "summary.json").read_text())["kv_cache_bytes_per_token"]
    assert kv["before"] == 2 * 2 * 32 * 4 and kv["after"] < 0.6 * kv["before"]  # layers x (K, V) x 32 x fp32
    assert "KV cache per token" in result.output
