"""The teacher-written corpus: shapes, determinism, dedup, the on-disk cache and its hostile inputs, mixing."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import make_model

from hypercompress.errors import UserError
from hypercompress.training import corpus
from hypercompress.training.corpus import mixed_picks, teacher_corpus
from hypercompress.training.decode import StaticDecoder, draw, kv_bytes_per_sequence

LENGTH, PROMPT = 24, 8


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.fixture
def prompts():
    return torch.randint(1, 120, (6, 32), generator=torch.Generator().manual_seed(5))


def write(model, prompts, tmp_path, **kw):
    settings = dict(tokens=5 * LENGTH, length=LENGTH, prompt_tokens=PROMPT, batch=8, cache_dir=tmp_path)
    return teacher_corpus(model, prompts, **{**settings, **kw})


def count_generate(monkeypatch, model):
    """Every decode call on `model` (the teacher's sampling loop), recorded."""
    calls = []
    original = corpus.decode
    monkeypatch.setattr(corpus, "decode", lambda teacher, **k: (calls.append(k) if teacher is model else None)
                        or original(teacher, **k))
    return calls


def patch_decode(monkeypatch, model, replace):
    """corpus.decode on `model` replaced by replace(input_ids=..., original=...) (its other keys passed on)."""
    original = corpus.decode
    monkeypatch.setattr(corpus, "decode", lambda teacher, **k: replace(
        original=lambda **kk: original(teacher, **kk), **k))


def only_file(folder):
    files = list(folder.glob("corpus-*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_shape_dtype_determinism_and_prompts_from_the_text(llama, prompts, tmp_path):
    notes = []
    out = write(llama, prompts, tmp_path / "a", tokens=5 * LENGTH - 3, progress=lambda d, t, n: notes.append((d, t, n)))
    assert out.shape == (5, LENGTH) and out.dtype == torch.int64  # ceil(117 / 24) windows
    assert torch.equal(out, write(llama, prompts, tmp_path / "b", tokens=5 * LENGTH - 3))  # same seed, no cache
    assert not torch.equal(out, write(llama, prompts, tmp_path / "c", tokens=5 * LENGTH - 3, seed=1))
    text = [prompts[r].tolist() for r in range(prompts.shape[0])]
    openings = [w[:PROMPT].tolist() for w in out]
    offsets = set()
    for opening in openings:  # each opening is a slice of a calibration row
        found = [(r, o) for r, row in enumerate(text) for o in range(32 - PROMPT + 1) if row[o:o + PROMPT] == opening]
        assert found, opening
        offsets.add(found[0][1])
    assert offsets != {0}  # not only the rows' first tokens
    assert notes[-1][:2] == (5 * LENGTH, 5 * LENGTH) and "tok/s" in notes[-1][2]


def test_gpt2_writes_a_corpus_and_top_p_narrows_the_choice(prompts, tmp_path):
    gpt2 = make_model("gpt2")
    assert write(gpt2, prompts, tmp_path / "gpt2").shape == (5, LENGTH)
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(200, 1)
    drawn = draw(logits, 1.0, 0.9, torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {0, 1}  # p = 0.72, 0.26, 0.01, ...: top-p 0.9 keeps the first two
    assert set(draw(logits, 1.0, 0.5, torch.Generator().manual_seed(0)).flatten().tolist()) == {0}


def test_dedup_drops_copies_loops_and_single_tokens_then_writes_more(llama, prompts, tmp_path, monkeypatch):
    """A teacher whose first batches hold a copy, a loop and a one-token window: those are dropped and
    replaced by later rounds; the windows returned are distinct and none is degenerate."""
    batches = []

    def degenerate(original, **kwargs):
        out = original(**kwargs)
        batches.append(out)
        if len(batches) == 2:
            out = out.clone()
            out[0] = batches[0][0]                                         # exact copy of a kept window
            out[1, PROMPT:] = torch.tensor([5, 6, 7]).repeat(LENGTH)[: LENGTH - PROMPT]   # a loop
        if len(batches) == 3:
            out = out.clone()
            out[0, PROMPT:] = 9                                            # one repeated token
            out[1, PROMPT:] = batches[0][1, PROMPT:]                       # a new prompt, the same text
        return out
    patch_decode(monkeypatch, llama, degenerate)
    out = write(llama, prompts, tmp_path, tokens=6 * LENGTH, batch=2)
    assert out.shape == (6, LENGTH) and len(batches) == 5  # round 1: 3 calls keep 2 of 6; round 2: 2 calls
    assert len({tuple(w.tolist()) for w in out}) == 6 and torch.equal(out[:2], batches[0])
    assert all(int(torch.bincount(w[PROMPT:]).max()) <= (LENGTH - PROMPT) // 2 for w in out)


def test_rounds_are_bounded_and_an_all_duplicate_teacher_is_an_error(llama, prompts, tmp_path, monkeypatch):
    patch_decode(monkeypatch, llama, lambda input_ids, **k: torch.cat(
        [input_ids, torch.full((input_ids.shape[0], LENGTH - PROMPT), 7)], 1))
    with pytest.raises(UserError, match="every window"):
        write(llama, prompts, tmp_path, batch=2)
    calls = []
    copies = lambda input_ids, **k: calls.append(1) or torch.cat(  # noqa: E731
        [input_ids, torch.arange(LENGTH - PROMPT).repeat(input_ids.shape[0], 1)], 1)
    patch_decode(monkeypatch, llama, copies)  # distinct only through the prompt, then near-copies
    with pytest.warns(UserWarning, match="only"):
        out = write(llama, prompts, tmp_path / "few", batch=2)
    assert 1 <= out.shape[0] < 5 and len(calls) <= 3 + corpus.EXTRA_ROUNDS * 3


def test_cache_reused_then_invalidated_by_weights_and_settings(prompts, tmp_path, monkeypatch):
    model = make_model("llama")
    calls = count_generate(monkeypatch, model)
    first = write(model, prompts, tmp_path)
    made = len(calls)
    assert made and torch.equal(write(model, prompts, tmp_path), first) and len(calls) == made  # no generation
    write(model, prompts, tmp_path, temperature=0.7)
    assert len(calls) > made and len(list(tmp_path.glob("corpus-*"))) == 2
    for other, change in ((prompts, dict(top_p=0.9)), (prompts, dict(seed=3)), (prompts, dict(length=LENGTH + 1)),
                          (prompts, dict(tokens=9 * LENGTH)), (prompts, dict(prompt_tokens=PROMPT + 1)),
                          (prompts.flip(0), {})):
        before = len(calls)
        write(model, other, tmp_path, **change)
        assert len(calls) > before, change
    before = len(calls)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 4] += 1e-3
    write(model, prompts, tmp_path)
    assert len(calls) > before


def corrupt_cases(data: bytes, header_size: int, header: dict) -> dict[str, bytes]:
    def with_header(changed: dict, body: bytes | None = None) -> bytes:
        raw = json.dumps(changed).encode()
        return struct.pack("<Q", len(raw)) + raw + (data[8 + header_size:] if body is None else body)
    wrong_dtype = json.loads(json.dumps(header))
    wrong_dtype["windows"]["dtype"] = "F64"
    huge = json.loads(json.dumps(header))
    huge["windows"]["shape"] = [2**40, LENGTH]
    huge["windows"]["data_offsets"] = [0, 2**40 * LENGTH * 8]
    body = bytearray(data[8 + header_size:])
    body[:8] = struct.pack("<q", 10**6)  # a token id far outside the vocabulary
    return {"truncated": data[:-13], "garbage header": b"\xff" * 8 + b"{junk" * 20, "empty": b"",
            "wrong dtype": with_header(wrong_dtype), "huge shape": with_header(huge),
            "out of vocabulary": with_header(header, bytes(body)),
            "huge header": struct.pack("<Q", 2**62) + data[8:]}


def test_a_corrupt_cache_is_rewritten_with_a_warning_or_refused_when_named(llama, prompts, tmp_path, monkeypatch, no_hang):
    good = write(llama, prompts, tmp_path)
    path = only_file(tmp_path)
    data = path.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + header_size])
    calls = count_generate(monkeypatch, llama)
    for name, broken in corrupt_cases(data, header_size, header).items():
        path.write_bytes(broken)
        before = len(calls)
        with pytest.warns(UserWarning, match="cannot be used"):
            assert torch.equal(write(llama, prompts, tmp_path), good), name
        assert len(calls) > before, name  # written again
        named = tmp_path / "named" / f"{name}.safetensors"
        named.parent.mkdir(exist_ok=True)
        named.write_bytes(broken)
        with pytest.raises(UserError, match="cannot be used") as error:
            write(llama, prompts, tmp_path, cache_file=named)
        assert "\n" not in str(error.value)


def test_a_named_cache_of_another_model_is_a_one_line_error(llama, prompts, tmp_path):
    named = tmp_path / "mine.safetensors"
    first = write(llama, prompts, tmp_path, cache_file=named)
    assert named.is_file() and torch.equal(write(llama, prompts, tmp_path, cache_file=named), first)
    other = make_model("llama")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    with pytest.raises(UserError, match="written by another model .*--corpus-cache DIR of this model"):
        write(other, prompts, tmp_path, cache_file=named)
    with pytest.raises(UserError, match="other settings"):
        write(llama, prompts, tmp_path, cache_file=named, temperature=0.5)


@pytest.mark.parametrize("bad, match", [(dict(tokens=0), "tokens"), (dict(length=1), "length"),
                                        (dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top-p"),
                                        (dict(top_p=1.5), "top-p"), (dict(batch=0), "batch"),
                                        (dict(prompt_tokens=LENGTH), "prompt_tokens"),
                                        (dict(prompt_tokens=40), "prompt_tokens")])
def test_bad_settings_are_one_line_errors(llama, prompts, tmp_path, bad, match):
    with pytest.raises(UserError, match=match):
        write(llama, prompts, tmp_path, **bad)
    with pytest.raises(UserError, match="vocabulary"):
        write(llama, prompts + 200, tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERCOMPRESS_CACHE", str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path / "corpus"
    monkeypatch.delenv("HYPERCOMPRESS_CACHE")
    assert corpus.default_cache_dir().parts[-3:] == (".cache", "hypercompress", "corpus")


def test_mixed_picks_draw_the_corpus_at_the_share():
    picks = mixed_picks(20_000, 30, 400, 0.25, torch.Generator().manual_seed(0))
    assert picks.min() >= 0 and picks.max() < 430
    assert abs(float((picks >= 30).float().mean()) - 0.25) < 0.015  # the share, whatever the pool sizes
    assert set(picks[picks < 30].tolist()) == set(range(30)) and len(set(picks[picks >= 30].tolist())) > 390
    again = mixed_picks(20_000, 30, 400, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(picks, again)
    assert mixed_picks(100, 30, 400, 0.0, torch.Generator()).max() < 30
    assert mixed_picks(100, 30, 0, 0.5, torch.Generator()).max() < 30
    for share in (1.0, -0.1):
        with pytest.raises(UserError, match="share"):
            mixed_picks(10, 30, 400, share, torch.Generator())


def test_the_static_decoder_writes_what_the_reference_loop_writes(llama):
    """StaticDecoder (one static cache reused batch after batch; uncompiled on a CPU) samples the same
    tokens as decode's dynamic-cache loop from the same generator, for a full batch and for a short one
    (padded to the batch, first rows returned)."""
    opening = torch.randint(1, 120, (4, PROMPT), generator=torch.Generator().manual_seed(1))
    decoder = StaticDecoder(llama, batch=4, length=LENGTH, device="cpu", compiled=False)
    for rows in (4, 4, 3):  # the second call reuses (resets) the cache the first filled
        generator, reference = torch.Generator().manual_seed(rows), torch.Generator().manual_seed(rows)
        static = decoder(opening[:rows], LENGTH - PROMPT, 1.0, 1.0, generator)
        if rows == 4:
            expected = corpus.decode(llama, input_ids=opening, new_tokens=LENGTH - PROMPT, temperature=1.0,
                                     top_p=1.0, generator=reference)
            assert torch.equal(static, expected)
        assert static.shape == (rows, LENGTH) and torch.equal(static[:, :PROMPT], opening[:rows])
    assert decoder.static and not decoder.compiled


def test_the_static_decoder_falls_back_with_a_warning_and_the_corpus_says_which_loop_wrote_it(
        llama, prompts, tmp_path, monkeypatch):
    out = write(llama, prompts, tmp_path / "static", static_cache=True)
    meta = json.loads(__import__("safetensors").safe_open(str(only_file(tmp_path / "static")), "pt").metadata()[corpus.META])
    assert out.shape == (5, LENGTH) and meta["stats"]["decoder"] == "static"

    def broken(self, *args):
        raise NotImplementedError("no static cache for this model")
    monkeypatch.setattr(StaticDecoder, "_forward", broken)
    with pytest.warns(UserWarning, match="static-cache decoding failed .*dynamic cache"):
        out = write(llama, prompts, tmp_path / "fallback", static_cache=True)
    assert out.shape == (5, LENGTH)
    assert torch.equal(out, write(llama, prompts, tmp_path / "dynamic", static_cache=False))  # the reference loop's


def test_the_default_batch_and_the_cache_size_per_sequence():
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3)
    assert kv_bytes_per_sequence(smollm2, 512) == 2 * 30 * 3 * 64 * 512 * 2  # 11.8 MB in bfloat16
    assert corpus.default_batch(make_model("llama"), 512, "cpu") == 16
