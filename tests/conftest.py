"""Tiny random models (hidden 64, 2 layers) and a word-level tokenizer, built in-test: no downloads."""

from __future__ import annotations

import random
import re
import signal
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, OlmoeConfig, OlmoeForCausalLM, Phi3Config,
                          Phi3ForCausalLM, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

WORDS = [f"w{i}" for i in range(120)]
DENSE_ARCHS = ["llama", "gpt2", "qwen3", "olmo2", "phi3", "phi", "gemma2", "gemma3"]
ARCHS = [*DENSE_ARCHS, "mixtral", "qwen3_moe", "olmoe"]  # and mixtures of experts (MOE below)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[UNK]")


MOE = {"mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4}),
       "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, {"num_experts": 4, "moe_intermediate_size": 64,
                                                          "mlp_only_layers": [1], "head_dim": 16}),
       "olmoe": (OlmoeConfig, OlmoeForCausalLM, {"num_experts": 4})}


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":  # untied lm_head, grouped-query attention
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=False)
        return LlamaForCausalLM(config).eval()
    if arch == "qwen3":  # per-head q/k RMSNorms, head_dim (32) not hidden / heads (16), tied head
        config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             max_position_embeddings=256, tie_word_embeddings=True)
        return Qwen3ForCausalLM(config).eval()
    if arch == "olmo2":  # norms after the sublayers, q/k norms over all heads
        config = Olmo2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return Olmo2ForCausalLM(config).eval()
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return Phi3ForCausalLM(config).eval()
    if arch == "phi":  # Phi-2: parallel attention and MLP, LayerNorm with biases, RoPE over half of each head
        config = PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                           partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return PhiForCausalLM(config).eval()
    if arch in ("gemma2", "gemma3"):  # sandwich norms (1 + w), scaled embedding, tied head; Gemma 2 soft-caps
        # its logits (a cap of 3 here, so the cap bends random logits), Gemma 3 has per-head q/k norms
        settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        if arch == "gemma2":
            return Gemma2ForCausalLM(Gemma2Config(**settings, final_logit_softcapping=3.0)).eval()
        return Gemma3ForCausalLM(Gemma3TextConfig(**settings)).eval()
    if arch in MOE:  # 4 experts, 2 per token; Qwen3-MoE's second block a dense MLP (mlp_only_layers)
        config_class, model_class, settings = MOE[arch]
        config = config_class(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                              tie_word_embeddings=False, **settings)
        return model_class(config).eval()
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()  # Conv1D weights, tied lm_head


@pytest.fixture(autouse=True, scope="session")
def corpus_cache_in_a_temporary_folder(tmp_path_factory):
    """Teacher-written corpora (training/corpus.py) are cached under $HYPERCOMPRESS_CACHE: never the
    user's home during the tests (subprocesses inherit it)."""
    import os

    saved = os.environ.get("HYPERCOMPRESS_CACHE")
    os.environ["HYPERCOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("hypercompress-cache"))
    yield
    if saved is None:
        os.environ.pop("HYPERCOMPRESS_CACHE", None)
    else:
        os.environ["HYPERCOMPRESS_CACHE"] = saved


def message_lines(stderr: str) -> list[str]:
    """The non-empty lines of a command's stderr without its progress lines ('[    3 s] loading ...',
    cli/progress.py): the error or warning lines a test checks."""
    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"^\[\s*\d+ s\] ", line)]


def write_text(path: Path, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def no_hang():
    """A test that blocks (a FIFO opened, a huge file read) fails after 60 s instead of hanging the suite."""
    def alarm(*_):
        raise TimeoutError("blocked for 60 s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def tied_llama(vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64) with a tied embedding of `vocab_size` rows, seeded: a model whose
    storage the embedding dominates, as SmolLM2's does."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny architecture saved as a local Hugging Face model directory."""
    dirs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        make_model(arch).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("data") / "eval.txt", words=3000, seed=1)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt", words=3000, seed=2)


@pytest.fixture
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(1, 121, (2, 32), generator=generator)


def rtn_trial_bpw(model: torch.nn.Module, plan, embedding: str, lossless: int | None) -> float:
    """Bits per original weight of the model.safetensors a planner plan writes with RTN codes,
    measured: a copy compressed by the plan's recipe (RTN in place of GPTQ) and serialized."""
    import copy

    from hypercompress.apply import apply_recipe
    from hypercompress.storage.artifact import stored_bytes
    from hypercompress.modules import count_params
    from hypercompress.planning.mixed_bits import plan_recipe
    from hypercompress.recipe import Recipe

    trial = copy.deepcopy(model)
    stages = [{k: v for k, v in s.items() if k != "act_order"} | {"method": "rtn"} for s in plan_recipe(plan, embedding)]
    apply_recipe(trial, Recipe.from_list(stages))
    return stored_bytes(trial, lossless) * 8 / count_params(model)
