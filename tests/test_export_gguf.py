"""GGUF export on tiny models built in-test: exact block re-packing, re-quantization cost, metadata,
the Q/K permutation, the embedded tokenizer, and refusals. transformers' GGUF loader reads the files
back (llama.cpp itself is exercised by benchmarks/llamacpp.py)."""

from __future__ import annotations

import json
import random
import types

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GemmaTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaTokenizer, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import hypercompress
from hypercompress.errors import UserError
from hypercompress.exporters import export
from hypercompress.exporters.gguf_writer import write
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from conftest import make_tokenizer

LINES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, 1234 times",
         "hello world; hello there. The end!"]
TEXTS = ["the lazy fox says hello 42", "  two  spaces, and a tab\tthere", "<|endoftext|> nine dogs"]
VOCAB = 320


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on three lines (full byte alphabet, 320 ids)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(LINES * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny(arch: str, tied: bool = False) -> torch.nn.Module:
    """conftest's tiny shapes (hidden 64, 4 heads, 2 kv heads, 2 layers) with a 320-token vocab."""
    torch.manual_seed(0)
    if arch == "gpt2":  # n_positions 1024: transformers' GGUF loader reads context_length as n_ctx
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)).eval()
    cls, config = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                   "qwen3": (Qwen3ForCausalLM, Qwen3Config), "phi3": (Phi3ForCausalLM, Phi3Config)}[arch]
    # Qwen3: head_dim is not hidden / heads; 128, Qwen3Config's default, because transformers' GGUF
    # loader (5.25) does not read qwen3.attention.key_length (llama.cpp does)
    extra = {"qwen3": {"head_dim": 128},  # Phi3Config's default special ids lie past this vocabulary
             "phi3": {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}}.get(arch, {})
    return cls(config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=50000.0, tie_word_embeddings=tied, **extra)).eval()


def gemma(arch: str, **overrides) -> torch.nn.Module:
    """A tiny Gemma 2 / 3 at the settings llama.cpp hard-codes and transformers' GGUF loader assumes
    (head_dim = query_pre_attn_scalar = 256, Gemma 2's caps 50 / 30, the default layer pattern), its
    norm weights away from 0 so that the stored 1 + w is checked."""
    torch.manual_seed(0)
    settings = {**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=256, max_position_embeddings=256,
                       sliding_window=16, pad_token_id=0, bos_token_id=0, eos_token_id=0), **overrides}
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**settings)).eval()
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**settings)).eval()
    for name, weight in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(weight, std=0.3)
    return model


def make_artifact(tmp_path, bpe, stages, arch="llama", tied=False, model=None):
    model = tiny(arch, tied) if model is None else model
    if arch == "qwen2":  # nonzero q/k/v biases, so their F32 copies are checked too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    if arch == "qwen3":  # q/k norm weights away from 1, so their copies are checked too
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    params = count_params(model)
    recipe = Recipe.from_list(stages)
    hypercompress.compress(model, recipe)
    return hypercompress.save(model, bpe, tmp_path / "artifact", recipe=recipe.to_list(),
                              original_params=params)


def logits_pair(artifact, out):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = hypercompress.load(artifact)
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()
    with torch.no_grad():
        return ours(ids).logits, theirs(ids).logits


def fields(path) -> tuple[dict, dict]:
    """(metadata without the long token arrays, tensors by name) of a GGUF file."""
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.endswith(("_id", ".model", ".pre"))}, {t.name: t for t in reader.tensors}


def test_exact_q4_1_grid_roundtrips_bit_for_bit(tmp_path, bpe):
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4, "group_size": 32,
                                              "zero_point": "float"}])
    report = export(artifact, "gguf", tmp_path / "gguf")
    blocks = {n: r for n, r in report["tensors"].items() if n.startswith("blk.") and n.endswith("weight")
              and "norm" not in n}
    assert len(blocks) == 14 and all(r == {**r, "type": "Q4_1", "exact": True, "rel_error": 0.0}
                                     for r in blocks.values())
    assert report["requantized"] == 0 and report["exact"] == len(report["tensors"])
    assert report["tensors"]["token_embd.weight"]["type"] == "F16" and "output.weight" in report["tensors"]
    assert report["file_type"] == "MOSTLY_Q4_1" and "0 re-quantized" not in report["summary"]
    ours, theirs = logits_pair(artifact, tmp_path / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    meta, tensors = fields(tmp_path / "gguf" / "model.gguf")
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 256
    assert (meta["llama.embedding_length"], meta["llama.block_count"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.rope.dimension_count"], meta["llama.vocab_size"]) == (64, 2, 128, 4, 2, 16, VOCAB)
    assert meta["llama.rope.freq_base"] == 50000.0 and meta["general.file_type"] == 3
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 0
    # K rows as llama.cpp's convert_hf_to_gguf.py permute(w, n_head, n_head_kv) leaves them
    model, _ = hypercompress.load(artifact)
    k = model.model.layers[1].self_attn.k_proj.dense_weight().numpy()
    expected = k.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(32, 64)
    stored = tensors["blk.1.attn_k.weight"]
    assert np.array_equal(dequantize(stored.data, stored.tensor_type).reshape(32, 64), expected)
    # --gguf-type leaves exactly mapped grids alone and types the rest (float16 embedding, head) ...
    types = {n: r["type"] for n, r in export(artifact, "gguf", tmp_path / "q8", gguf_type="Q8_0")["tensors"].items()}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    # ... and force_type puts every 2-D weight in it (F32: all exact)
    report = export(artifact, "gguf", tmp_path / "f32", gguf_type="f32", force_type=True)
    assert {r["type"] for r in report["tensors"].values()} == {"F32"} and report["requantized"] == 0


def test_int_zero_g64_is_requantized_with_measured_cost(tmp_path, bpe):
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4, "group_size": 64,
                                              "zero_point": "int"}])
    report = export(artifact, "gguf", tmp_path / "gguf")
    errors = [r["rel_error"] for r in report["tensors"].values() if not r["exact"]]
    assert report["requantized"] == len(errors) >= 1 and all(0 < e < 0.01 for e in errors)
    assert "re-quantized (Q4_1" in report["summary"] and len(report["notes"]) == 9  # 8 worst + "... and 6 more"
    ours, theirs = logits_pair(artifact, tmp_path / "gguf")
    assert (theirs - ours).abs().max() < 0.02 * ours.abs().max()
    # every code minus its zero fits int8: with --gguf-type Q8_0 the same grid is stored exactly
    report = export(artifact, "gguf", tmp_path / "q8", gguf_type="Q8_0")
    assert report["requantized"] == 2  # only the dense float16 embedding and lm_head are re-rounded
    assert all(r["exact"] and r["type"] == "Q8_0" for n, r in report["tensors"].items()
               if n.startswith("blk.") and "norm" not in n)


def test_tied_qwen2_quant_embedding_and_gpt2(tmp_path, bpe):
    stages = [{"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True},
              {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True,
               "targets": [r"^model\.embed_tokens$"]}]
    artifact = make_artifact(tmp_path / "q", bpe, stages, arch="qwen2", tied=True)
    report = export(artifact, "gguf", tmp_path / "q" / "gguf")
    assert "output.weight" not in report["tensors"] and report["requantized"] == 0
    assert report["tensors"]["token_embd.weight"]["type"] == "Q8_0"
    assert report["tensors"]["blk.0.attn_q.weight"]["type"] == "Q4_0"
    assert report["tensors"]["blk.0.attn_q.bias"]["type"] == "F32"
    ours, theirs = logits_pair(artifact, tmp_path / "q" / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    artifact = make_artifact(tmp_path / "g", bpe, [{"method": "rtn", "bits": 4, "group_size": 32,
                                                    "zero_point": "float"}], arch="gpt2")
    report = export(artifact, "gguf", tmp_path / "g" / "gguf")
    assert report["tensors"]["blk.0.attn_qkv.weight"] == {**report["tensors"]["blk.0.attn_qkv.weight"],
                                                          "type": "Q4_1", "exact": True}
    assert report["tensors"]["position_embd.weight"]["type"] == "F32" and "output.weight" not in report["tensors"]
    ours, theirs = logits_pair(artifact, tmp_path / "g" / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_qwen3_with_q_k_norms_and_its_own_head_dim(tmp_path, bpe):
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4, "group_size": 32,
                                              "zero_point": "float"}], arch="qwen3", tied=True)
    report = export(artifact, "gguf", tmp_path / "gguf")
    assert report["tensors"]["blk.0.attn_q_norm.weight"]["type"] == "F32"
    assert report["tensors"]["blk.0.attn_q.weight"] == {**report["tensors"]["blk.0.attn_q.weight"],
                                                        "type": "Q4_1", "exact": True}
    meta, _ = fields(tmp_path / "gguf" / "model.gguf")
    assert meta["general.architecture"] == "qwen3" and meta["qwen3.attention.key_length"] == 128
    ours, theirs = logits_pair(artifact, tmp_path / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_phi3_with_fused_qkv_and_gate_up(tmp_path, bpe):
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4, "group_size": 32,
                                              "zero_point": "float"}], arch="phi3")
    report = export(artifact, "gguf", tmp_path / "gguf")
    assert report["tensors"]["blk.0.attn_qkv.weight"] == {**report["tensors"]["blk.0.attn_qkv.weight"],
                                                          "type": "Q4_1", "exact": True}
    assert report["tensors"]["blk.0.ffn_up.weight"]["type"] == "Q4_1"  # gate_up_proj, fused as llama.cpp keeps it
    ours, theirs = logits_pair(artifact, tmp_path / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_embedded_tokenizer_encodes_the_same_ids(tmp_path, bpe):
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 8, "group_size": 32}])
    export(artifact, "gguf", tmp_path / "gguf")
    _, original = hypercompress.load(artifact)
    back = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    for text in TEXTS:
        assert back(text)["input_ids"] == original(text)["input_ids"]
        assert back.decode(back(text)["input_ids"]) == text
    assert (back.bos_token_id, back.eos_token_id) == (original.bos_token_id, original.eos_token_id)


def test_refusals_are_one_line_user_errors(tmp_path, bpe, model_dirs):
    model, _ = hypercompress.load(make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4}]))
    with pytest.raises(UserError, match=r"WordLevel tokenizer .*byte-level BPE .*SentencePiece BPE") as info:
        write(model, make_tokenizer(), {}, tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"--gguf-type Q3_K: .* one of F32, F16"):
        write(model, bpe, {}, tmp_path, gguf_type="Q3_K")
    for family in ("opt", "olmo2", "phi"):  # unknown; known, but no GGUF reader here
        other = types.SimpleNamespace(config=types.SimpleNamespace(model_type=family))
        with pytest.raises(UserError, match=rf"architecture '{family}' cannot be exported to GGUF.*qwen3"):
            write(other, bpe, {}, tmp_path)
    assert not list(tmp_path.glob("*.gguf"))
    with pytest.raises(UserError, match="WordLevel"):  # through export(): nothing left behind
        export(make_artifact(tmp_path / "w", make_tokenizer(), [{"method": "rtn", "bits": 4}],
                             arch="llama"), "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_export_writes_a_tensor_beyond_its_type(tmp_path, bpe):
    """An artifact keeps a dense norm (1e5) and an untied lm_head entry (1e5) in float32: the GGUF
    export writes that head as F32 (GGUF types are per tensor) and refuses a --gguf-type that
    stores with float16 scales; the hf and compressed-tensors exports refuse --dtype float16
    naming the tensor; nothing is left behind; wider types export finite."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(1e5)
        model.lm_head.weight[0, 0] = 1e5
    recipe = Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 32}])
    hypercompress.compress(model, recipe)
    artifact = hypercompress.save(model, bpe, tmp_path / "wide", recipe=recipe.to_list(), original_params=1)
    report = export(artifact, "gguf", tmp_path / "gguf")
    assert report["tensors"]["output.weight"]["type"] == "F32"
    _, tensors = fields(tmp_path / "gguf" / "model.gguf")
    for name, tensor in tensors.items():
        if tensor.tensor_type.name in ("F32", "F16"):
            assert np.isfinite(np.asarray(tensor.data, dtype=np.float32)).all(), name
    with pytest.raises(UserError, match=r"tensor lm_head.weight holds values beyond float16's range .*Q8_0"):
        export(artifact, "gguf", tmp_path / "q8", gguf_type="Q8_0")
    for fmt in ("hf", "compressed-tensors"):
        with pytest.raises(UserError, match=r"holds values beyond float16's range .*--dtype bfloat16"):
            export(artifact, fmt, tmp_path / f"{fmt}-16", dtype="float16")
        assert not (tmp_path / f"{fmt}-16").exists()
    export(artifact, "hf", tmp_path / "hf-32", dtype="float32")
    assert not (tmp_path / "q8").exists()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_norms_window_and_caps(tmp_path, bpe, arch):
    """Gemma's norms are stored as llama.cpp keeps them (1 + w), with head_dim, the sliding window and
    Gemma 2's soft-caps as keys; transformers' GGUF loader gives the artifact's logits (24 tokens pass
    the window of 16). A config llama.cpp would run differently is refused, nothing written."""
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4, "group_size": 32,
                                              "zero_point": "float"}], model=gemma(arch))
    report = export(artifact, "gguf", tmp_path / "gguf")
    assert "output.weight" not in report["tensors"] and report["requantized"] == 0
    assert report["tensors"]["blk.0.attn_q.weight"]["type"] == "Q4_1"
    assert not any("does not read" in note for note in report["notes"])
    meta, tensors = fields(tmp_path / "gguf" / "model.gguf")
    assert meta["general.architecture"] == arch and meta[f"{arch}.attention.key_length"] == 256
    assert meta[f"{arch}.attention.sliding_window"] == 16
    if arch == "gemma2":
        assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"]) == (50.0, 30.0)
    else:
        assert "gemma3.attn_logit_softcapping" not in meta and meta["gemma3.rope.freq_base"] == 1e6
    model, _ = hypercompress.load(artifact)
    stored = np.asarray(tensors["blk.1.post_ffw_norm.weight"].data)
    assert np.array_equal(stored, model.model.layers[1].post_feedforward_layernorm.weight.detach().numpy() + 1)
    ours, theirs = logits_pair(artifact, tmp_path / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    refused = {"query_pre_attn_scalar 256 .*1/sqrt\\(16\\)": gemma(arch, head_dim=16),
               "layer_types": gemma(arch, layer_types=["full_attention", "full_attention"]),
               "hidden_activation gelu": gemma(arch, hidden_activation="gelu")}
    if arch == "gemma2":
        refused["untied lm_head"] = gemma(arch, tie_word_embeddings=False)
        refused["soft-cap of None"] = gemma(arch, final_logit_softcapping=None)
    else:
        refused["sliding-layer RoPE"] = gemma(arch, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    for i, (why, model) in enumerate(refused.items()):
        artifact = make_artifact(tmp_path / f"r{i}", bpe, [{"method": "rtn", "bits": 4}], model=model)
        with pytest.raises(UserError, match=rf"this {model.config.model_type} cannot be exported to GGUF: "
                                            rf"llama.cpp's {arch} hard-codes .*{why}") as info:
            export(artifact, "gguf", tmp_path / f"r{i}" / "out")
        assert "\n" not in str(info.value) and not (tmp_path / f"r{i}" / "out").exists()


def test_gemma_settings_transformers_gguf_loader_skips_get_a_note(tmp_path, bpe):
    """Gemma 2's soft-caps are keys llama.cpp reads, so other caps export; transformers' GGUF loader
    would assume its defaults (50 / 30), which the report says by name."""
    artifact = make_artifact(tmp_path, bpe, [{"method": "rtn", "bits": 4}],
                             model=gemma("gemma2", final_logit_softcapping=20.0))
    report = export(artifact, "gguf", tmp_path / "gguf")
    notes = [n for n in report["notes"] if "does not read" in n]
    assert len(notes) == 1 and "final_logit_softcapping (it assumes 30.0, this model has 20.0)" in notes[0]
    assert fields(tmp_path / "gguf" / "model.gguf")[0]["gemma2.final_logit_softcapping"] == 20.0


SPM_LINES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, 1234 times",
             "hello world; hello there. The end!"]
SPM_TEXTS = ["the lazy fox says hello 42", "two  spaces, and a tab\tthere", "caf\u00e9 \u2603 nine dogs"]


def sentencepiece(cls, specials: list[str], vocab_size: int = VOCAB, byte_tokens: bool = True):
    """A SentencePiece-style BPE (spaces as U+2581, byte fallback) trained on three lines, wrapped in
    transformers' LlamaTokenizer or GemmaTokenizer, which bring their own normalizer and decoder."""
    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)] if byte_tokens else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_pieces, show_progress=False)
    core.train_from_iterator(SPM_LINES * 10, trainer)
    spec = json.loads(core.to_str())["model"]
    # the trainer numbers tokens in merge order; shuffled ids keep a score that follows ids from passing
    fixed = len(specials) + len(byte_pieces)
    pieces = sorted(spec["vocab"], key=spec["vocab"].get)
    moved = pieces[fixed:]
    random.Random(1).shuffle(moved)
    vocab = {piece: i for i, piece in enumerate(pieces[:fixed] + moved)}
    return cls(vocab=vocab, merges=[tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
                                    for m in spec["merges"]])


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], types: list[int], space_prefix: bool):
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), written out: characters, then join the
    adjacent pair whose text is the vocabulary entry of highest score (the leftmost on a tie) until
    none is; a piece outside the vocabulary becomes its UTF-8 bytes' <0xXX> tokens."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4)}  # NORMAL, USER_DEFINED
    symbols = list(((" " if space_prefix else "") + text).replace(" ", "\u2581"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for piece in symbols:
        out += [ids[piece]] if piece in ids else [tokens.index(f"<0x{b:02X}>") for b in piece.encode()]
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sentencepiece_tokenizer_is_embedded_as_llama_cpp_reads_it(tmp_path, arch):
    """A byte-fallback BPE (Llama-2, Mistral, Gemma) is written as tokenizer.ggml.model "llama": byte
    and unknown tokens typed, scores in merge order. llama.cpp's algorithm run on the file's tokens
    and scores and transformers' GGUF tokenizer both give the tokenizer's own ids."""
    cls, specials = ((LlamaTokenizer, ["<unk>", "<s>", "</s>"]) if arch == "llama"
                     else (GemmaTokenizer, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
    tokenizer = sentencepiece(cls, specials, vocab_size=400)
    model = tiny("llama") if arch == "llama" else gemma("gemma2")
    model.resize_token_embeddings(400)
    model.config.update(dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or 0))
    artifact = make_artifact(tmp_path, tokenizer, [{"method": "rtn", "bits": 4, "group_size": 32,
                                                    "zero_point": "float"}], model=model)
    export(artifact, "gguf", tmp_path / "gguf")
    reader = GGUFReader(tmp_path / "gguf" / "model.gguf")
    read = lambda key: reader.fields[key].contents()
    tokens, scores, types = read("tokenizer.ggml.tokens"), read("tokenizer.ggml.scores"), read("tokenizer.ggml.token_type")
    assert (read("tokenizer.ggml.model"), read("tokenizer.ggml.add_space_prefix")) == ("llama", arch == "llama")
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("<unk>")] == 2  # BYTE, UNKNOWN
    assert types[tokenizer.bos_token_id] == 3 and len(tokens) == 400  # CONTROL
    _, original = hypercompress.load(artifact)
    back = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    rng = random.Random(0)  # words and letters of the training lines shuffled: pieces whose merge order decides
    words = " ".join(SPM_LINES).split()
    scrambled = [" ".join(rng.sample(words, 3)) for _ in range(100)]
    scrambled += ["".join(rng.sample(text, len(text))).strip() for text in scrambled]
    for text in SPM_TEXTS + scrambled:
        expected = original(text, add_special_tokens=False)["input_ids"]
        assert llama_cpp_spm(text, tokens, scores, types, arch == "llama") == expected, text
        assert back(text, add_special_tokens=False)["input_ids"] == expected, text
    assert any(tokens[i].startswith("<0x") for text in SPM_TEXTS for i in original(text)["input_ids"])
    ours, theirs = logits_pair(artifact, tmp_path / "gguf")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    no_bytes = sentencepiece(cls, specials, vocab_size=120, byte_tokens=False)
    model = tiny("llama") if arch == "llama" else gemma("gemma2")
    artifact = make_artifact(tmp_path / "nb", no_bytes, [{"method": "rtn", "bits": 8}], model=model)
    with pytest.raises(UserError, match=r"falls back to bytes but lacks 256 byte tokens \(<0x00> \.\.\.\); llama.cpp"):
        export(artifact, "gguf", tmp_path / "nb" / "out")
