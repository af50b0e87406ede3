"""Text sources, evaluation windows and the seeded calibration sampler.

The whole text is tokenized once (no special tokens); evaluation cuts it into non-overlapping
windows of `seq_len` tokens (the tail shorter than a window is dropped); calibration draws N windows
of L tokens at seeded random offsets.
"""

from __future__ import annotations

from typing import Any

import torch

from ..arch import check_length
from ..errors import UserError
from .text_source import check_text_source


def read_text(spec: str) -> str:
    """A local text file, or (online) a `datasets` spec NAME:CONFIG:SPLIT, e.g.
    wikitext:wikitext-2-raw-v1:test (rows of its 'text' column joined by blank lines); checked first
    by text_source.check_text_source."""
    path = check_text_source(spec)
    if path is not None:
        text = path.read_text(encoding="utf-8", errors="replace")
        _refuse_binary(spec, text)
    else:
        text = _dataset_text(spec)
    if not text.strip():
        raise UserError(f"{spec} holds no text; pass a non-empty text file")
    return text


MAX_UNDECODABLE_SHARE = 0.01  # of characters: a stray bad byte passes, a binary file does not


def _refuse_binary(spec: str, text: str) -> None:
    """UserError for a file that is not text: NUL bytes, or more than 1% of its characters
    undecodable as UTF-8 (a binary, compressed or random file passed as text)."""
    bad = text.count("\ufffd")
    if "\x00" in text or (text and bad > MAX_UNDECODABLE_SHARE * len(text)):
        raise UserError(f"{spec} is not UTF-8 text ({bad:,} of {len(text):,} characters undecodable"
                        f"{', NUL bytes' if chr(0) in text else ''}); pass a plain text file")


def _dataset_text(spec: str) -> str:
    try:
        import datasets
    except ImportError:
        raise UserError(f"data spec {spec} needs the 'datasets' package: "
                        "pip install 'hypercompress[hub]'") from None
    name, config, split = spec.split(":")
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for a bad name or no network
        raise UserError(f"could not load data set {spec}: {str(exc).splitlines()[0]}; check the name or "
                        "pass a local text file") from None
    return "\n\n".join(rows["text"])


TOKENIZE_CHARS = 1 << 20  # characters per tokenizer call: a fast tokenizer given one 50 MB line at once
                          # holds several GiB (offsets, pre-token splits) and a Python list of its ids


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens, tokenized in
    pieces of about TOKENIZE_CHARS characters (memory bounded whatever the text's lines). Each piece
    ends where a word ends and the next begins with a space, where pre-tokenizers (byte-level BPE,
    SentencePiece's Metaspace, whitespace) split anyway, so the ids are those of one call; a piece
    with no such place in 1 MiB is cut before other whitespace, else where it is."""
    pieces, start = [], 0
    while start < len(text):
        end = _piece_end(text, start, TOKENIZE_CHARS)
        ids = tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        start = end
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _piece_end(text: str, start: int, size: int) -> int:
    """The end of the piece from `start`: len(text) when the rest fits `size`, else the last place
    before start + size where a non-space character is followed by a space (else by any whitespace)."""
    limit = start + size
    if limit >= len(text):
        return len(text)
    cut = text.rfind(" ", start + 1, limit + 1)
    while cut > start and text[cut - 1].isspace():
        cut = text.rfind(" ", start + 1, cut)
    if cut > start:
        return cut
    for cut in range(limit, start, -1):
        if text[cut].isspace() and not text[cut - 1].isspace():
            return cut
    return limit


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows: (N, seq_len), the first `max_windows` of them if given."""
    if seq_len < 2:
        raise UserError(f"seq_len {seq_len} is too short; use --seq-len 2 or more")
    count = ids.numel() // seq_len
    if count == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than seq_len {seq_len}; "
                        "use a smaller --seq-len or a longer text")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"max_windows {max_windows} must be at least 1; pass 1 or more")
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


def calibration_samples(ids: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` tokens at offsets drawn with `seed`: (count, length)."""
    if ids.numel() < length:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than the sample length "
                        f"{length}; use a longer text")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=generator)
    return torch.stack([ids[s: s + length] for s in starts.tolist()])


def calibration_windows(calib: torch.Tensor | str, tokenizer: Any, config: Any, count: int, length: int,
                        seed: int) -> torch.Tensor:
    """(N, L) int64 calibration windows for a model of `config`: `calib` given as an (N, L) integer
    tensor (checked), or `count` windows of `length` tokens drawn with `seed` from `calib`, the text
    itself (read_text's result), tokenized by `tokenizer`. UserError for a tensor of another shape or
    dtype, a text without a tokenizer, a length beyond the model's positions, a text shorter than one
    window."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int32, torch.int64) or calib.shape[1] < 2:
            raise UserError(f"calib: token windows must be an (N, L) integer tensor with L >= 2, got "
                            f"{tuple(calib.shape)} {calib.dtype}; pass a text file or such a tensor")
        check_length(config, calib.shape[1], "--calib-len")
        return calib.long()
    if tokenizer is None:
        raise UserError("calibration text needs the model's tokenizer: pass tokenizer= with a loaded model")
    check_length(config, length, "--calib-len")
    return calibration_samples(tokenize(tokenizer, calib), count, length, seed)
