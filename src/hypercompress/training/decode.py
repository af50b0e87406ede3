"""The teacher's sampling loops for its training corpus (training/corpus.py).

- `decode`: the reference loop, any transformers causal LM on any device: one prefill, then one token
  per forward on a growing (dynamic) key/value cache; bf16 autocast on CUDA.
- `StaticDecoder`: the fast loop a whole corpus reuses: one static key/value cache of (batch, length)
  positions, written in place batch after batch, the teacher as a bfloat16 copy on CUDA, and on CUDA
  the one-token forward compiled with CUDA graphs (torch.compile mode="reduce-overhead"), so a step
  costs the GPU's work instead of some thousand Python-side kernel launches. A model whose forward
  does not compile is decoded uncompiled, and one without static-cache support by `decode`, each with
  a warning. Speeds: benchmarks/corpus_speed.py.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch

KV_MEMORY_SHARE = 0.4   # at most this share of the free GPU memory goes to the static cache
MAX_BATCH = 1024        # sequences written at once on CUDA (benchmarks/corpus_speed.py)


def decode(teacher: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, temperature: float, top_p: float,
           generator: torch.Generator, vocab: int | None = None) -> torch.Tensor:
    """(B, P) prompts -> (B, P + new_tokens): the teacher samples `new_tokens` tokens after each prompt,
    batched, reusing its key/value cache (one prefill, then one token per forward). A plain loop over
    the model's forward, not `generate` (whose per-step machinery cost more than the model on an H100).
    On CUDA the forward runs under bf16 autocast (the teacher the engine trains against is bf16 too).
    `vocab`: sample among the first `vocab` ids only (a student's rows; default all)."""
    from ..layers.latent_kv import cache_keyword

    device, keyword = input_ids.device, cache_keyword(teacher)  # `cache` (transformers 5.2x) or `past_key_values`
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    tokens, step_input, cache = [input_ids], input_ids, None
    with torch.inference_mode(), autocast:
        for _ in range(new_tokens):
            out = teacher(input_ids=step_input, use_cache=True, logits_to_keep=1, **{keyword: cache})
            cache = getattr(out, keyword)
            step_input = draw(out.logits[:, -1, :vocab].float(), temperature, top_p, generator)
            tokens.append(step_input)
    return torch.cat(tokens, 1)


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids sampled at `temperature` from the smallest set of tokens whose
    probability reaches `top_p` (all of them at 1.0)."""
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        ordered, index = probs.sort(-1, descending=True)
        outside = ordered.cumsum(-1) - ordered >= top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, index, ordered.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


def kv_bytes_per_sequence(config, length: int, element_bytes: int = 2) -> int:
    """Bytes of keys and values one sequence of `length` tokens holds over all layers (transformers
    config: num_hidden_layers, num_key_value_heads (else num_attention_heads), head_dim (else
    hidden_size / num_attention_heads))."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * length * element_bytes


def default_batch(teacher: torch.nn.Module, length: int, device: str | torch.device) -> int:
    """Sequences written at once: 16 on a CPU; on CUDA the largest power of two up to MAX_BATCH whose
    bfloat16 key/value cache of `length` positions fits KV_MEMORY_SHARE of the free GPU memory (at
    least 1)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(KV_MEMORY_SHARE * free) // max(kv_bytes_per_sequence(teacher.config, length), 1)
    batch = MAX_BATCH
    while batch > 1 and batch > fits:
        batch //= 2
    return batch


class StaticDecoder:
    """`decode` for a whole corpus of windows of `length` tokens written `batch` at a time (module doc).

    teacher: a transformers causal LM; device: where it runs (a bfloat16 copy is made on CUDA, the
    caller's model is left as it was); compiled: compile the one-token step (default: on CUDA).
    A call with fewer than `batch` prompts writes a full batch (prompts repeated) and returns the
    first rows, so the step keeps one shape and one CUDA graph."""

    def __init__(self, teacher: torch.nn.Module, batch: int, length: int, device: str | torch.device,
                 compiled: bool | None = None):
        from transformers import StaticCache

        from ..layers.latent_kv import cache_keyword
        from .engine import cast_copy

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.model = cast_copy(teacher, self.device, torch.bfloat16).eval() if cuda else teacher
        self.batch, self.length, self.keyword = batch, length, cache_keyword(teacher)
        self.cache = StaticCache(config=teacher.config, max_cache_len=length)
        self.positions = torch.arange(length, device=self.device)
        self.compiled = cuda if compiled is None else compiled
        self.step = torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if self.compiled \
            else self._forward
        self.static, self.steps, self.warmup_seconds = True, 0, 0.0  # warm-up: the first 2 compiled steps

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, cache_position=positions,
                         **{self.keyword: self.cache})
        return out.logits[:, -1]

    def __call__(self, input_ids: torch.Tensor, new_tokens: int, temperature: float, top_p: float,
                 generator: torch.Generator, vocab: int | None = None) -> torch.Tensor:
        """(B, P) prompts, B <= batch -> (B, P + new_tokens), as `decode`; P + new_tokens <= length."""
        rows, prompt = input_ids.shape
        if not self.static:
            return decode(self.model, input_ids=input_ids, new_tokens=new_tokens, temperature=temperature,
                          top_p=top_p, generator=generator, vocab=vocab)
        full = input_ids[torch.arange(self.batch, device=input_ids.device) % rows]
        try:
            return self._write(full, prompt, new_tokens, temperature, top_p, generator, vocab)[:rows]
        except Exception as exc:  # noqa: BLE001 - third-party model code: fall back to the reference loop
            if self.compiled:
                warnings.warn(f"the compiled decoding step failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "writing the corpus uncompiled (slower)", stacklevel=2)
                self.compiled, self.step = False, self._forward
            else:
                warnings.warn(f"static-cache decoding failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "writing the corpus with a dynamic cache (slower)", stacklevel=2)
                self.static = False
            return self(input_ids, new_tokens, temperature, top_p, generator, vocab)

    def _write(self, input_ids, prompt, new_tokens, temperature, top_p, generator, vocab) -> torch.Tensor:
        tokens = [input_ids]
        with torch.no_grad():  # not inference_mode: the cache tensors are reset in place between batches
            self.cache.reset()
            logits = self._forward(input_ids, self.positions[:prompt])  # prefill, uncompiled
            for index in range(new_tokens):
                token = draw(logits[:, :vocab].float(), temperature, top_p, generator)
                tokens.append(token)
                if index + 1 < new_tokens:
                    tick = time.perf_counter()
                    if self.compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = self.step(token, self.positions[prompt + index: prompt + index + 1])
                    if self.compiled and self.steps < 2:  # compilation, then the CUDA graph's capture
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        self.warmup_seconds += time.perf_counter() - tick
                    self.steps += 1
        return torch.cat(tokens, 1)

    def close(self) -> None:
        """Release the cache, the bfloat16 copy and the compiled graphs' memory."""
        self.cache = self.model = self.step = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
