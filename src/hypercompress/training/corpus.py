"""A training corpus the original (teacher) model writes itself, cached on disk under a content hash.

Below 4 bits only training recovers a small model, and the calibration text alone is small and of one
domain; the teacher samples as much text as the budget asks, from prompts cut out of that text.

- Window: `prompt_tokens` real tokens (a prompt) followed by `length - prompt_tokens` tokens the teacher
  samples (temperature, top-p; no top-k, no repetition penalty: the teacher's own distribution). An
  end-of-text token does not stop a window: the teacher goes on writing past it, as past a document end.
- Prompt rule (PROMPT_RULE 1): prompt i is `prompts[r, o : o + prompt_tokens]`, r cycling through the
  calibration rows in a fresh seeded permutation per cycle, o drawn uniformly from [0, T - prompt_tokens]
  by the same seeded generator, so prompts start anywhere in the text, not only at window starts.
- Dedup: a window is dropped when it equals a kept one, when one token fills over half of its sampled
  part or that part is a loop (fewer than half of its 8-grams distinct; both judged on parts of 16
  tokens or more), or when 90% or more of its sampled part's 8-grams already occur in the kept windows
  (a memorised passage written again). Once a part has 256 or more 8-grams, those whose hash is
  divisible by 8 stand for all (shift-invariant sampling: the seen set costs ~8 bytes per token). Dropped windows are written again with new prompts,
  at most EXTRA_ROUNDS more times; a budget still unmet then gives fewer windows and a warning.
- Cache: `<dir>/corpus-<key>.safetensors` holding one int64 tensor "windows" (M, length) and, in its
  header metadata, JSON: key, teacher fingerprint, settings, statistics. See `corpus_key`.

Sampling (training/decode.py): on CUDA `StaticDecoder` (a static key/value cache reused batch after
batch, the bfloat16 teacher, the one-token step compiled with CUDA graphs), elsewhere `decode`'s
batched loop on a dynamic cache. Throughput (generated tokens/s): benchmarks/corpus_speed.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError, user_path
from .decode import StaticDecoder, decode, default_batch

FORMAT, PROMPT_RULE, EXTRA_ROUNDS, NGRAM = 1, 1, 4, 8
MAX_HEADER = 1 << 20  # a safetensors header larger than this is not one of ours
META = "hypercompress_corpus"
Progress = Callable[[int, int, str], None]  # progress(done_tokens, total_tokens, note)


def default_cache_dir() -> Path:
    """`$HYPERCOMPRESS_CACHE/corpus` when that variable is set, else `~/.cache/hypercompress/corpus`."""
    root = os.environ.get("HYPERCOMPRESS_CACHE")
    return (user_path(root) if root else Path.home() / ".cache" / "hypercompress") / "corpus"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) of the model's class, its config JSON (less transformers_version and _name_or_path)
    and the name, dtype, shape and every byte of each parameter and buffer. ~0.3 s for 135M fp32
    parameters on one CPU core (sha256 runs at ~2 GB/s)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None else {}
    for volatile in ("transformers_version", "_name_or_path"):
        settings.pop(volatile, None)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


def corpus_key(fingerprint: str, prompts: torch.Tensor, settings: dict[str, Any]) -> str:
    """sha256 (hex) of FORMAT, the teacher fingerprint, the prompt tensor (shape and int64 bytes) and
    `settings` (tokens, length, prompt_tokens, temperature, top_p, seed, prompt_rule). The batch size
    and the device are left out on purpose: they change which sample is drawn, not its distribution,
    so a corpus written on a GPU with batch 64 serves a CPU run with batch 8."""
    digest = hashlib.sha256(f"corpus-v{FORMAT}|{fingerprint}|{tuple(prompts.shape)}|".encode())
    digest.update(prompts.to("cpu", torch.int64).contiguous().numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def teacher_corpus(teacher: torch.nn.Module, prompts: torch.Tensor, *, tokens: int, length: int,
                   temperature: float = 1.0, top_p: float = 1.0, prompt_tokens: int | None = None,
                   batch: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                   cache_file: str | Path | None = None, device: str | torch.device | None = None,
                   progress: Progress | None = None, static_cache: bool | None = None,
                   vocab: int | None = None) -> torch.Tensor:
    """(M, length) int64 windows the teacher wrote, M = ceil(tokens / length) (fewer, with a warning,
    only when EXTRA_ROUNDS rounds of rewriting could not replace the duplicates; see the module doc).

    teacher: a transformers causal LM (eval mode). prompts: (N, T) int64 calibration token windows,
    T >= prompt_tokens. tokens: the budget in tokens; length: window length in tokens (prompt included);
    prompt_tokens: real tokens opening each window (default min(32, length // 2)); batch: sequences
    written at once (default `decode.default_batch`: 16 on a CPU, up to 1024 on CUDA as memory allows);
    static_cache: write with `StaticDecoder` (default: on CUDA) instead of `decode`; seed: CPU runs
    are bit-for-bit repeatable; device: where prompts go (default: the teacher's). Cache: `cache_file` names the file exactly (a file of another model or settings, or an
    unreadable one, is a UserError); otherwise `cache_dir` (default `default_cache_dir()`) holds files
    named by `corpus_key`, and an unreadable one is written again with a warning.
    progress(done_tokens, total_tokens, note): kept tokens so far, note gives throughput (tok/s).
    vocab: write only ids below it (another teacher's padded rows beyond a student's; training/teacher.py).
    Raises UserError for tokens <= 0, length < 2, temperature <= 0, top_p outside (0, 1], a bad
    prompt tensor or prompt_tokens, batch < 1, or when every written window was a duplicate."""
    rows = teacher.get_input_embeddings().num_embeddings
    limit = vocab if vocab is not None and vocab < rows else None
    vocab = limit or rows
    run_on = torch.device(device) if device is not None else next(teacher.parameters()).device
    batch = default_batch(teacher, length, run_on) if batch is None else batch
    prompt_tokens = _check(prompts, tokens, length, temperature, top_p, prompt_tokens, batch, vocab)
    settings = {"tokens": int(tokens), "length": int(length), "prompt_tokens": prompt_tokens,
                "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed),
                "prompt_rule": PROMPT_RULE, **({"vocab": limit} if limit else {})}
    fingerprint = model_fingerprint(teacher)
    key = corpus_key(fingerprint, prompts, settings)
    explicit = cache_file is not None
    path = user_path(cache_file) if explicit else user_path(cache_dir or default_cache_dir()) / f"corpus-{key[:40]}.safetensors"
    count = math.ceil(tokens / length)
    if path.exists():
        try:
            windows = _read_corpus(path, fingerprint, key, vocab, length, count)
            if progress is not None:
                progress(windows.numel(), count * length, f"read from {path}")
            return windows
        except _Unreadable as exc:
            if explicit:
                raise UserError(f"corpus cache {path} cannot be used ({exc}); delete it or pass another file") from None
            warnings.warn(f"corpus cache {path} cannot be used ({exc}); writing it again", stacklevel=2)
    static = run_on.type == "cuda" if static_cache is None else static_cache
    windows, stats = _write(teacher, prompts, count, length, prompt_tokens, temperature, top_p, batch, seed,
                            run_on, progress, static, limit)
    _save(path, windows, {"format": FORMAT, "key": key, "fingerprint": fingerprint, "settings": settings,
                          "stats": stats}, explicit)
    return windows


def _check(prompts, tokens, length, temperature, top_p, prompt_tokens, batch, vocab) -> int:
    def integer(value):
        return isinstance(value, int) and not isinstance(value, bool)
    if not integer(tokens) or tokens <= 0:
        raise UserError(f"corpus tokens {tokens!r} must be a positive integer; pass e.g. 1000000")
    if not integer(length) or length < 2:
        raise UserError(f"corpus window length {length!r} must be an integer of 2 or more; pass e.g. 512")
    if not temperature > 0 or not math.isfinite(temperature):
        raise UserError(f"sampling temperature {temperature!r} must be a finite number above 0; pass e.g. 1.0")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p {top_p!r} must lie in (0, 1]; pass 1.0 to sample from the full distribution")
    if not integer(batch) or batch < 1:
        raise UserError(f"generation batch {batch!r} must be a positive integer; pass e.g. 16")
    if not (isinstance(prompts, torch.Tensor) and prompts.ndim == 2 and prompts.numel() > 0
            and not prompts.is_floating_point() and prompts.dtype != torch.bool):
        raise UserError("corpus prompts must be a non-empty (N, T) integer tensor of token ids")
    if prompts.min() < 0 or prompts.max() >= vocab:
        raise UserError(f"corpus prompts hold token ids outside the teacher's vocabulary [0, {vocab})")
    if prompt_tokens is None:
        prompt_tokens = min(32, length // 2, prompts.shape[1])
    if not integer(prompt_tokens) or not 1 <= prompt_tokens < length or prompt_tokens > prompts.shape[1]:
        raise UserError(f"prompt_tokens {prompt_tokens!r} must lie in [1, {length}) and not exceed the "
                        f"prompt windows' {prompts.shape[1]} tokens")
    return prompt_tokens


def _write(teacher, prompts, count, length, prompt_tokens, temperature, top_p, batch, seed, device, progress,
           static, vocab=None):
    """(windows (m, length), stats): generation rounds until `count` windows survive dedup."""
    decoder = StaticDecoder(teacher, batch, length, device) if static else None
    try:
        return _rounds(teacher, decoder, prompts, count, length, prompt_tokens, temperature, top_p, batch, seed,
                       device, progress, vocab)
    finally:
        if decoder is not None:
            decoder.close()


def _rounds(teacher, decoder, prompts, count, length, prompt_tokens, temperature, top_p, batch, seed, device,
            progress, vocab=None):
    order = _PromptRule(prompts, prompt_tokens, seed)
    dedup = _Dedup(prompt_tokens)
    kept, written, calls, start = [], 0, 0, time.perf_counter()
    for _ in range(1 + EXTRA_ROUNDS):  # a round writes the shortfall at its start, in batches
        need = count - len(kept)
        for first in range(0, need, batch):
            size = min(batch, need - first)
            opening = order.take(size).to(device)
            out = _sample(teacher, opening, length - prompt_tokens, temperature, top_p, seed, calls, decoder, vocab)
            if out.shape != (size, length):
                raise RuntimeError(f"decode returned {tuple(out.shape)}, not ({size}, {length})")
            calls, written = calls + 1, written + size * (length - prompt_tokens)
            kept += [row for row in out.to("cpu", torch.int64) if dedup.keep(row)]
            rate = written / max(time.perf_counter() - start, 1e-9)
            if progress is not None:
                progress(len(kept) * length, count * length,
                         f"{rate:,.0f} tok/s | {dedup.dropped} dropped")
        if len(kept) == count:
            break
    if not kept:
        raise UserError("every window the teacher wrote was a duplicate or a repetition loop; raise the "
                        "temperature or top-p, or pass more varied prompt text")
    if len(kept) < count:
        warnings.warn(f"the teacher wrote only {len(kept)} distinct windows of the {count} asked "
                      f"({dedup.dropped} duplicates or loops dropped); using those", stacklevel=3)
    seconds = time.perf_counter() - start
    stats = {"windows": len(kept), "dropped": dedup.dropped, "generated_tokens": written, "calls": calls,
             "seconds": round(seconds, 3), "tokens_per_second": round(written / max(seconds, 1e-9), 1),
             "batch": batch, "device": str(device),
             "decoder": "dynamic" if decoder is None else "static, compiled" if decoder.compiled else "static",
             "warmup_seconds": round(decoder.warmup_seconds, 3) if decoder is not None else 0.0}
    return torch.stack(kept), stats


def _sample(teacher, opening, new, temperature, top_p, seed, call, decoder=None, vocab=None) -> torch.Tensor:
    """(B, P + new) from `decoder` (a StaticDecoder) or `decode`, seeded per call: the same seed,
    call and decoder give the same tokens."""
    call_seed = int.from_bytes(hashlib.sha256(f"{seed}:{call}".encode()).digest()[:7], "little")
    generator = torch.Generator(device=opening.device).manual_seed(call_seed)
    was_training = teacher.training
    teacher.eval()
    try:
        if decoder is not None:
            return decoder(opening, new, temperature, top_p, generator, vocab)
        return decode(teacher, input_ids=opening, new_tokens=new, temperature=temperature, top_p=top_p,
                      generator=generator, vocab=vocab)
    finally:
        teacher.train(was_training)


class _PromptRule:
    """PROMPT_RULE 1 (module docstring): openings at seeded rows and offsets of the (N, T) prompts."""

    def __init__(self, prompts: torch.Tensor, size: int, seed: int):
        self.prompts, self.size, self.rows = prompts.to("cpu", torch.int64), size, []
        self.generator = torch.Generator().manual_seed(seed)

    def take(self, count: int) -> torch.Tensor:
        openings = []
        for _ in range(count):
            if not self.rows:
                self.rows = torch.randperm(self.prompts.shape[0], generator=self.generator).tolist()
            row = self.rows.pop()
            offset = int(torch.randint(0, self.prompts.shape[1] - self.size + 1, (1,), generator=self.generator))
            openings.append(self.prompts[row, offset: offset + self.size])
        return torch.stack(openings)


class _Dedup:
    """The dedup rules of the module docstring; `keep(window)` records a kept window's 8-grams."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.exact, self.seen, self.dropped = prompt_tokens, set(), set(), 0

    def keep(self, window: torch.Tensor) -> bool:
        part = window[self.prompt_tokens:]
        size = min(NGRAM, part.numel())
        grams = [hash(tuple(g)) for g in part.unfold(0, size, 1).tolist()]
        sampled = [g for g in grams if g % 8 == 0] if len(grams) >= 256 else grams
        whole = hash(tuple(window.tolist()))
        judged = part.numel() >= 2 * NGRAM  # too short a part to call a loop
        loop = judged and len(set(grams)) < 0.5 * len(grams)
        one_token = judged and int(torch.bincount(part).max()) > 0.5 * part.numel()
        seen = sum(g in self.seen for g in sampled) >= 0.9 * len(sampled) if sampled and self.seen else False
        if whole in self.exact or loop or one_token or seen:
            self.dropped += 1
            return False
        self.exact.add(whole)
        self.seen.update(sampled)
        return True


class _Unreadable(Exception):
    """A cache file that is not a corpus of this teacher and these settings (the message says why)."""


def _read_header(handle, size: int) -> tuple[int, dict, dict]:
    """(header length, header, our metadata) of an open corpus file of `size` bytes, bounded and
    checked before anything else is read; _Unreadable otherwise."""
    head = handle.read(8)
    claimed = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= claimed <= min(MAX_HEADER, size - 8):
        raise _Unreadable("no safetensors header")
    try:
        header = json.loads(handle.read(claimed))
        meta = json.loads(header["__metadata__"][META])
        for k in ("shape", "dtype", "data_offsets"):
            header["windows"][k]
    except (ValueError, KeyError, TypeError):
        raise _Unreadable("not a corpus file of this version") from None
    if not isinstance(meta, dict) or set(header) != {"__metadata__", "windows"} or meta.get("format") != FORMAT:
        raise _Unreadable("not a corpus file of this version")
    return claimed, header, meta


def _same_model(path: Path, meta: dict, fingerprint: str) -> None:
    if meta.get("fingerprint") != fingerprint:
        raise UserError(f"corpus cache {path} was written by another model (fingerprint "
                        f"{str(meta.get('fingerprint'))[:12]}, not {fingerprint[:12]}); delete it or "
                        "pass --corpus-cache DIR of this model")


def check_corpus_file(path: str | Path, teacher: torch.nn.Module) -> None:
    """Before any work: a corpus file named by the user (`--corpus-cache FILE.safetensors`) that exists
    must be one of ours, written by this model (a missing one is written there). UserError otherwise."""
    path = user_path(path)
    if not path.exists():
        return
    try:
        if not path.is_file():
            raise _Unreadable("not a regular file")
        with open(path, "rb") as handle:
            _, _, meta = _read_header(handle, path.stat().st_size)
    except (_Unreadable, OSError) as exc:
        raise UserError(f"corpus cache {path} cannot be used ({exc}); delete it or pass another file") from None
    _same_model(path, meta, model_fingerprint(teacher))


def _read_corpus(path: Path, fingerprint: str, key: str, vocab: int, length: int, count: int) -> torch.Tensor:
    """The (m, length) int64 windows of a cache file, 1 <= m <= count, ids in [0, vocab). The header is
    read and checked (size bounded, one I64 tensor of a shape that fits the file exactly) before any
    tensor byte is. A file of another model (fingerprint) is a UserError; anything else wrong raises
    _Unreadable (a torn, edited or foreign file)."""
    if not path.is_file():
        raise _Unreadable("not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        claimed, header, meta = _read_header(handle, size)
        shape, dtype, offsets = (header["windows"][k] for k in ("shape", "dtype", "data_offsets"))
        _same_model(path, meta, fingerprint)
        if meta.get("key") != key:
            raise _Unreadable(f"written with other settings: {json.dumps(meta.get('settings'))[:300]}")
        if not (dtype == "I64" and isinstance(shape, list) and len(shape) == 2 and shape[1] == length
                and isinstance(shape[0], int) and 1 <= shape[0] <= count):
            raise _Unreadable(f"tensor of dtype {dtype} and shape {shape}, not I64 (1..{count}, {length})")
        data = shape[0] * length * 8
        if offsets != [0, data] or size != 8 + claimed + data:
            raise _Unreadable(f"{size} bytes, not the {8 + claimed + data} its header describes")
        raw = bytearray(handle.read(data))
        if len(raw) != data:
            raise _Unreadable("shorter than its header says")
        windows = torch.frombuffer(raw, dtype=torch.int64).view(shape[0], length)
    if windows.min() < 0 or windows.max() >= vocab:
        raise _Unreadable(f"token ids outside the teacher's vocabulary [0, {vocab})")
    return windows


def _save(path: Path, windows: torch.Tensor, meta: dict[str, Any], explicit: bool) -> None:
    from safetensors.torch import save_file

    from ..storage.atomic import replace_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, lambda tmp: save_file({"windows": windows.contiguous()}, str(tmp),
                                                 metadata={META: json.dumps(meta, sort_keys=True)}))
    except OSError as exc:
        if explicit:
            raise UserError(f"cannot write the corpus cache {path} ({exc.strerror}); pass a writable path") from None
        warnings.warn(f"cannot write the corpus cache {path} ({exc.strerror}); it will not be reused", stacklevel=3)


def mixed_picks(count: int, calibration_rows: int, corpus_rows: int, share: float,
                generator: torch.Generator) -> torch.Tensor:
    """(count,) int64 row indices into cat([calibration (N, L), corpus (M, L)]): each pick is a corpus
    row with probability `share` (uniform among the M), else a calibration row (uniform among the N),
    drawn with `generator`; so teacher-written text is `share` of what training sees, in expectation,
    however many windows each pool holds. With M = 0 or share 0 every pick is a calibration row.
    Raises UserError for share outside [0, 1) or an empty calibration pool."""
    if not 0 <= share < 1:
        raise UserError(f"corpus share {share!r} must lie in [0, 1); pass e.g. 0.5 for half teacher-written text")
    if calibration_rows < 1:
        raise UserError("no calibration windows to train on; pass a longer --calib text")
    calibration = torch.randint(0, calibration_rows, (count,), generator=generator)
    if corpus_rows == 0 or share == 0:
        return calibration
    written = calibration_rows + torch.randint(0, corpus_rows, (count,), generator=generator)
    return torch.where(torch.rand(count, generator=generator) < share, written, calibration)
