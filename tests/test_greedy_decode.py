"""Our greedy loop (kernels/greedy.py, installed by kernels/decode.py): the same sequences as
transformers' greedy search on every tiny architecture, and every other call left to transformers."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, make_model
from hypercompress.kernels.decode import greedy_unsupported, plain_greedy, use_fast_decode


def _hf(model, *args, **kwargs):
    return type(model).generate(model, *args, **kwargs)


def _prompts(batch: int = 3, length: int = 9, pad: int = 0):
    """Left-padded prompts: row 1 has 2 pads, row 2 has 5, and their attention mask."""
    ids = torch.randint(4, 120, (batch, length), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    for row, pads in ((1, 2), (2, 5)):
        if row < batch:
            ids[row, :pads], mask[row, :pads] = pad, 0
    return ids, mask


def _served(arch: str):
    model = make_model(arch)
    return model, use_fast_decode(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_greedy_calls_equal_transformers_on_every_architecture(arch):
    model, description = _served(arch)
    reason = greedy_unsupported(model)
    if reason is not None:  # served by transformers: the description says why
        assert reason in description and not hasattr(model, "hypercompress_greedy")
        assert arch in ("gpt2", "gemma2", "gemma3")
        return
    ids, mask = _prompts()
    for kwargs in (dict(max_new_tokens=12, do_sample=False),
                   dict(max_new_tokens=12, min_new_tokens=12, pad_token_id=0),
                   dict(max_new_tokens=30, pad_token_id=0, eos_token_id=[5, 9, 17, 33, 65])):
        for inputs in (dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[:1])):
            ours = model.generate(**inputs, **kwargs)
            assert model.hypercompress_greedy.last_path == "eager", model.hypercompress_greedy.last_path
            assert torch.equal(ours, _hf(model, **inputs, **kwargs)), (arch, kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "olmo2", "mixtral"])
def test_the_static_step_cuda_records_equals_transformers(arch):
    """The step CUDA records (static cache, our 4D mask, positions and cache slot advanced in
    place), run eagerly on the CPU: transformers' greedy tokens, padding and end ids included."""
    from hypercompress.kernels.greedy import GreedyDecoder

    model, _ = _served(arch)
    model.hypercompress_greedy = GreedyDecoder(model, static=True)
    ids, mask = _prompts()
    for kwargs in (dict(max_new_tokens=40, pad_token_id=0), dict(max_new_tokens=40, pad_token_id=0, eos_token_id=[5, 9]),
                   dict(max_new_tokens=12, min_new_tokens=12, pad_token_id=0, eos_token_id=[5, 9])):
        ours = model.generate(ids, attention_mask=mask, **kwargs)
        assert model.hypercompress_greedy.last_path == "static, eager"
        assert torch.equal(ours, _hf(model, ids, attention_mask=mask, **kwargs)), (arch, kwargs)


def test_sequences_stop_where_transformers_stops_them():
    """End ids picked from transformers' own output: a sequence ends there and emits the pad id after,
    and the call stops at the step where the last sequence ended."""
    model, _ = _served("llama")
    ids, mask = _prompts()
    free = _hf(model, ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0)
    ends = [int(free[0, 9 + 6]), int(free[1, 9 + 20]), int(free[2, 9 + 3])]
    lengths = []
    for eos in (ends[:1], [ends[1]], ends):
        kwargs = dict(attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=eos)
        ours, reference = model.generate(ids, **kwargs), _hf(model, ids, **kwargs)
        assert model.hypercompress_greedy.last_path == "eager"
        assert torch.equal(ours, reference), eos
        lengths.append(ours.shape[1])
    assert lengths[-1] < free.shape[1]  # every sequence ended before 40 tokens: stopped early


def test_mask_inferred_from_pad_ids_and_generation_config_as_transformers_does():
    from transformers import GenerationConfig

    model, _ = _served("llama")
    ids, _ = _prompts(pad=2)
    config = GenerationConfig(max_new_tokens=10, pad_token_id=2, eos_token_id=127)
    ours = model.generate(ids, config)
    assert model.hypercompress_greedy.last_path == "eager"
    assert torch.equal(ours, _hf(model, ids, config))
    assert torch.equal(model.generate(ids, max_new_tokens=10, pad_token_id=2),
                       _hf(model, ids, max_new_tokens=10, pad_token_id=2))


def test_bfloat16_and_repeated_calls():
    model, _ = _served("qwen3")
    model.to(torch.bfloat16)
    ids, mask = _prompts()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0)
    assert torch.equal(first, again) and torch.equal(first, _hf(model, ids, attention_mask=mask, max_new_tokens=16,
                                                               pad_token_id=0))
    for batch in (1, 2, 4):  # more shapes than the decoder keeps: the oldest is dropped, outputs stay right
        ids, mask = _prompts(batch)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0),
                           _hf(model, ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0))
    assert len(model.hypercompress_greedy._steps) <= 2


@pytest.mark.parametrize("kwargs, reason", [
    (dict(max_new_tokens=5, do_sample=True), "sample"),
    (dict(max_new_tokens=5, num_beams=2), "beam"),
    (dict(max_new_tokens=5, repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
    (dict(max_new_tokens=5, min_new_tokens=2), "logits processor Min"),
    (dict(max_new_tokens=5, return_dict_in_generate=True, output_scores=True), "return_dict_in_generate"),
    (dict(max_new_tokens=5, cache_implementation="dynamic"), "cache_implementation='dynamic'"),
    (dict(max_new_tokens=5, stop_strings=["x"]), "stop_strings"),
    (dict(max_length=12), "no max_new_tokens"),
    (dict(max_new_tokens=5, streamer=object()), "streamer given"),
    (dict(max_new_tokens=5, stopping_criteria=[]), "stopping_criteria given"),
    (dict(max_new_tokens=5, token_type_ids=torch.zeros(2, 9, dtype=torch.long)), "model inputs ['token_type_ids']"),
    (dict(max_new_tokens=3.0), "max_new_tokens=3.0"),
    (dict(max_new_tokens=5, attention_mask=torch.tensor([[1] * 7 + [0] * 2] * 2)), "right-padded attention_mask"),
])
def test_other_calls_are_left_to_transformers(kwargs, reason):
    model, _ = _served("llama")
    ids = _prompts(2)[0]
    assert reason in plain_greedy(model, (ids,), kwargs)
    if {"streamer", "stopping_criteria", "token_type_ids", "stop_strings"} & set(kwargs):
        return  # transformers itself refuses these made-up values
    out = model.generate(ids, **kwargs)
    assert model.hypercompress_greedy.last_path.startswith("transformers (") and reason in \
        model.hypercompress_greedy.last_path
    seqs = out.sequences if hasattr(out, "sequences") else out
    assert seqs.shape[0] == (2 * kwargs.get("num_return_sequences", 1))


def test_bad_inputs_get_transformers_own_error():
    model, _ = _served("llama")
    with pytest.raises(Exception) as ours:
        model.generate(torch.randn(2, 4), max_new_tokens=3)
    with pytest.raises(Exception) as theirs:
        _hf(model, torch.randn(2, 4), max_new_tokens=3)
    assert type(ours.value) is type(theirs.value)


def test_sliding_window_models_go_to_transformers():
    """A sliding window's static cache keeps only the window: one mask cannot serve it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16, max_position_embeddings=256)).eval()
    assert "sliding attention window (16)" in use_fast_decode(model)
    ids = _prompts(1)[0]
    assert torch.equal(model.generate(ids, max_new_tokens=20), _hf(model, ids, max_new_tokens=20))


def test_load_serves_generate_through_the_loop(model_dirs, tmp_path):
    from hypercompress.storage import artifact
    from test_triton_kernels import _artifact

    path = _artifact(model_dirs["llama"], {"bits": 4, "group_size": 32}, tmp_path / "a")
    model, _ = artifact.load(path)
    assert model.hypercompress_decode.startswith("greedy: our loop")
    ids, mask = _prompts()
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    assert model.hypercompress_greedy.last_path == "eager"
    assert torch.equal(ours, _hf(model, ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0))
    del model.generate  # the documented opt-out: transformers' generate again
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0), ours)


def test_a_deep_copy_decodes_with_its_own_loop():
    import copy

    model, _ = _served("llama")
    ids, mask = _prompts()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    twin = copy.deepcopy(model)
    assert twin.hypercompress_greedy.model is twin and not twin.hypercompress_greedy._steps
    assert torch.equal(twin.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0), first)
    assert twin.hypercompress_greedy.last_path == "eager"


def test_an_int32_prompt_comes_back_as_int64_as_from_transformers():
    model, _ = _served("llama")
    ids = _prompts(1)[0].int()
    ours = model.generate(ids, max_new_tokens=4)
    assert model.hypercompress_greedy.last_path == "eager"
    reference = _hf(model, ids, max_new_tokens=4)
    assert ours.dtype == reference.dtype == torch.int64 and torch.equal(ours, reference)
