"""The tokenizer a GGUF file embeds, written as llama.cpp's convert_hf_to_gguf.py writes it.

Two kinds of tokenizer.json are held, each checked before anything is written:

| tokenizer.json | tokenizer.ggml.model | as the converter's |
|---|---|---|
| byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3) | gpt2, with tokenizer.ggml.pre naming llama.cpp's pre-tokenizer | `_set_vocab_gpt2` |
| SentencePiece BPE with byte fallback (Llama-2, Mistral, Gemma) | llama: tokens spelled with U+2581, scores, BYTE tokens `<0xXX>` | `_set_vocab_sentencepiece` |

llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined text is the
vocabulary entry of highest score (ties: the leftmost); Hugging Face's BPE merges the pair of lowest
merge rank. A token's score here is minus the rank of the first merge that makes it, so both merge
in the same order (a SentencePiece BPE model's own scores have that order; the converter copies
them from tokenizer.model, which an artifact does not keep). The merges are written too, for readers
that rebuild a BPE (transformers' GGUF loader); llama.cpp ignores them for this model.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ..errors import UserError

# the split regexes of Qwen2's and Llama-3's tokenizer.json -> llama.cpp's pre-tokenizer names
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}
SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass
class Vocab:
    model: str                      # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str                        # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]                # gguf.TokenType per id
    scores: list[float] | None      # "llama" only
    add_space_prefix: bool | None   # "llama" only: a space is put before the text (Llama-2: yes, Gemma: no)
    special: gguf.SpecialVocab      # merges, special ids, add-BOS/EOS flags

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def vocab(tokenizer, vocab_size: int, config=None) -> Vocab:
    """The GGUF vocabulary of a fast tokenizer for a model of `vocab_size` rows: ids the tokenizer does
    not use are "[PAD<id>]" tokens of type UNUSED; special ids come from the tokenizer, then (as the
    converter reads the model folder) from the model's config. Raises UserError for a tokenizer
    neither GGUF model above holds, or one whose ids pass vocab_size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    what = type(tokenizer).__name__
    if backend is None:
        raise UserError(f"tokenizer {what} has no tokenizer.json (not a fast tokenizer); the GGUF export "
                        "needs a byte-level BPE or a SentencePiece BPE tokenizer (use --format hf)")
    spec = json.loads(backend.to_str())
    model_kind = spec["model"]["type"]
    decoders = _decoders(spec)
    if model_kind == "BPE" and decoders == ["ByteLevel"]:
        kind = "gpt2"
        pre = _pre_tokenizer(spec)
        normalizer = (spec.get("normalizer") or {}).get("type")
        if pre is None or normalizer not in (None, "NFC"):
            shown = json.dumps(spec.get("pre_tokenizer"))[:120]
            raise UserError(f"tokenizer pre-tokenizer {shown} (normalizer {normalizer}) matches no llama.cpp "
                            "pre-tokenizer known here (gpt-2, smollm, qwen2, llama-bpe); use --format hf")
    elif model_kind == "BPE" and spec["model"].get("byte_fallback") and "ByteFallback" in decoders:
        kind, pre = "llama", "default"
        space_prefix = _sentencepiece_prefix(spec, what)
    else:
        raise UserError(f"tokenizer {what} is a {model_kind} tokenizer (decoder {'+'.join(decoders) or None}); "
                        "GGUF export writes byte-level BPE (GPT-2 style) and SentencePiece BPE (byte fallback) "
                        "tokenizers only (use --format hf)")
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(ids) >= vocab_size:
        raise UserError(f"tokenizer id {max(ids)} is beyond the model's vocab_size {vocab_size}; "
                        "re-create the artifact with a matching tokenizer")
    if kind == "llama":
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in tokenizer.get_vocab()]
        if missing:
            raise UserError(f"tokenizer {what} falls back to bytes but lacks {len(missing)} byte tokens "
                            f"({missing[0]} ...); llama.cpp fails on text that needs them (use --format hf)")
    added = tokenizer.added_tokens_decoder
    unk = spec["model"].get("unk_token") or getattr(tokenizer, "unk_token", None)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(ids[i])
        if kind == "llama" and ids[i] == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif kind == "llama" and BYTE_TOKEN.fullmatch(ids[i]):
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    special = _special(tokenizer, vocab_size, config, what)
    if kind == "gpt2":
        return Vocab("gpt2", pre, tokens, types, None, None, special)
    return Vocab("llama", pre, tokens, types, merge_scores(spec["model"]["merges"], tokens), space_prefix, special)


def merge_scores(merges: list, tokens: list[str]) -> list[float]:
    """Per id: minus the rank of the first merge making the token; tokens no merge makes score below
    every merged one (-(merges + 1 + id)), so llama.cpp joins them last and never before a merge."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, r)
    return [float(-rank[t]) if t in rank else float(-(len(merges) + 1 + i)) for i, t in enumerate(tokens)]


def _decoders(spec: dict[str, Any]) -> list[str]:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return [p.get("type") for p in parts if p]


def _sentencepiece_prefix(spec: dict[str, Any], what: str) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts U+2581 before the text (llama.cpp's
    add_space_prefix), checking that it turns spaces into U+2581 and splits nothing else, as llama.cpp's
    SentencePiece tokenizer does. UserError otherwise."""
    norm = spec.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else ([norm] if norm else [])
    pre = spec.get("pre_tokenizer") or {}
    replace = lambda p: p.get("type") == "Replace" and p.get("pattern") == {"String": " "} and p.get("content") == SPACE
    prepend = [p for p in norms if p.get("type") == "Prepend" and p.get("prepend") == SPACE]
    spaces_replaced = any(replace(p) for p in norms)
    others = [p.get("type") for p in norms if not replace(p) and p not in prepend]
    if pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE and not pre.get("split", True):
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        ok, prefix = not norms, scheme in ("first", "always")
    elif not pre or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        ok, prefix = spaces_replaced and not others, bool(prepend)  # Gemma splits at " " after none is left
    else:
        ok, prefix = False, False
    if not ok:
        shown = json.dumps({"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")})[:160]
        raise UserError(f"tokenizer {what} falls back to bytes but its {shown} is not SentencePiece's "
                        "(spaces as U+2581, nothing split); llama.cpp would tokenize text differently "
                        "(use --format hf)")
    return prefix


def _pre_tokenizer(spec: dict[str, Any]) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a byte-level tokenizer.json pre-tokenizer, None if unknown."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def _special(tokenizer, vocab_size: int, config, what: str) -> gguf.SpecialVocab:
    """Merges, special ids and add-BOS/EOS flags, as the converter's SpecialVocab reads a model folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if config is not None:  # config.json: the converter's fallback for bos / eos / pad ids
            config.to_json_file(str(Path(tmp) / "config.json"))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError(f"tokenizer {what} has no BPE merges; re-create the artifact with its tokenizer.json")
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if kind not in special.special_token_ids and token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]  # what the tokenizer adds itself
    full = tokenizer("a")["input_ids"]
    bos = len(full) > len(plain) and full[:1] == [tokenizer.bos_token_id] != plain[:1]
    eos = len(full) - len(plain) > bos and full[-1:] == [tokenizer.eos_token_id] != plain[-1:]
    special.add_special_token.update(bos=bool(bos), eos=bool(eos))
    return special
