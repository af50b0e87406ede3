"""Greedy decoding without transformers' per-token machinery: one model forward per token, and on
CUDA that forward replayed as one recorded CUDA graph (no Python, no host sync per token).

Why: `generate` spends host time at every token (input preparation, logits processors, stopping
criteria that sync, cache bookkeeping): on an H100 an 8-layer Llama-2-7B-shaped model took the same
~3 ms a step at batch 1 and 16 through its compiled static step, far above the ~1.2 ms its weights
take to read, so a faster kernel could not show (our loop: 2.1 ms dense, 1.9 ms w4). On CUDA a step is
  - a static KV cache (transformers' `StaticCache`, allocated once per batch size and length bucket),
  - a 4D additive attention mask (batch, 1, 1, cache length) that the step itself opens one position
    wider, and position ids / cache position that it advances: every input lives in a tensor the
    step updates in place, so
  - on CUDA the step (forward, greedy pick, the bookkeeping above) is captured once with
    `torch.cuda.CUDAGraph` after two eager steps (kernels compiled, cuBLAS initialised) and replayed;
    the host checks for end-of-sequence every `CHECK_EVERY` tokens only. No torch.compile: nothing
    to compile, a capture takes well under a second.
The CPU loops eagerly over transformers' dynamic cache (no mask where nothing is padded): about as
fast as `generate` there (0-8% faster on a 2-core VM), the forward's own work dominating.
The prompt (prefill) runs eagerly through the model's own mask code. Outputs equal `generate`'s
greedy ones: the same positions (`cumsum(mask) - 1`), the same attention inputs up to masked
positions, end-of-sequence handling and padding as transformers do it. decode.py decides which
`generate` calls are plain greedy ones and sends only those here.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so one captured step serves many lengths
CHECK_EVERY = 16  # tokens between end-of-sequence checks (host syncs)
KEPT_STEPS = 2  # captured steps (with their caches) kept per model, least recently used dropped


def _ids(values: list[int], device) -> torch.Tensor:
    """(E,) int64 token ids; [-1] (matching no token) for none."""
    return torch.tensor(values or [-1], device=device, dtype=torch.long)


def _banned(ids: list[int], vocab: int, device) -> torch.Tensor | None:
    """(vocab,) bool, True at `ids`; None for no ids."""
    if not ids:
        return None
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[[i for i in ids if 0 <= i < vocab]] = True
    return banned


@dataclass
class _Step:
    """The tensors one decode step reads and advances in place (shapes for batch B, cache length L)."""

    cache: object  # transformers StaticCache
    token: torch.Tensor  # (B, 1) int64: the token to feed
    position: torch.Tensor  # (B, 1) int64: its position id
    cache_position: torch.Tensor  # (1,) int64: its slot in the cache
    mask: torch.Tensor  # (B, 1, 1, L) compute dtype: 0 where attended, the dtype's min elsewhere
    done: torch.Tensor  # (B,) bool: the sequence produced an end-of-sequence token
    out: torch.Tensor  # (B, L) int64: generated tokens, column t = the t-th new token
    index: torch.Tensor  # (1,) int64: the column the next token goes to
    eos: torch.Tensor  # (E,) int64 end-of-sequence ids (E >= 1; -1 where there are none)
    pad: torch.Tensor  # () int64: what finished sequences emit
    banned: torch.Tensor | None  # (vocab,) bool: ids never picked (min_new_tokens), set at the prefill; None: none
    graph: torch.cuda.CUDAGraph | None = None
    eager_steps: int = 0


class GreedyDecoder:
    """`decode(input_ids, attention_mask, ...)` -> the sequences `generate` returns for greedy search.

    One per model (decode.py keeps it as `model.hypercompress_greedy`). `static`: decode over a
    static cache with the step recorded as a CUDA graph (default: on CUDA; True also elsewhere, the
    same step run eagerly); else transformers' dynamic cache, eagerly. `last_path` says how the
    last call decoded ("cuda graph" / "static, eager" / "eager")."""

    def __init__(self, model: nn.Module, static: bool | None = None):
        self.model = model
        self.static = static
        self.last_path = ""
        self.graph_problem: str | None = None  # why the step is not recorded on CUDA (None: it is)
        self._steps: OrderedDict = OrderedDict()
        from ..layers.latent_kv import cache_keyword

        names = set(inspect.signature(model.forward).parameters)
        self._cache_name = cache_keyword(model)
        self._has_cache_position = "cache_position" in names
        self._has_logits_to_keep = "logits_to_keep" in names

    def __getstate__(self) -> dict:
        """A copy (deepcopy) keeps the settings, not the recorded steps (graphs and caches of this
        process's GPU memory): it records its own."""
        return {**self.__dict__, "_steps": OrderedDict(), "last_path": "", "graph_problem": None}

    def _forward(self, ids, mask, position, cache, cache_position) -> torch.Tensor:
        """Logits (B, vocab) of the last position."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position, self._cache_name: cache,
                  "use_cache": True}
        if self._has_cache_position:
            kwargs["cache_position"] = cache_position
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1]

    def _new_cache(self, batch: int, length: int, device, dtype):
        from transformers import StaticCache

        try:  # transformers 5: allocated at the first update
            return StaticCache(config=self.model.config, max_cache_len=length)
        except TypeError:  # transformers 4.57
            return StaticCache(config=self.model.config, max_batch_size=batch, max_cache_len=length,
                               device=device, dtype=dtype)

    def _state(self, batch: int, length: int, device, dtype, eos: list[int], pad: int,
               suppress: list[int]) -> _Step:
        key = (batch, length, device, dtype, tuple(eos), pad, tuple(suppress))
        step = self._steps.pop(key, None)
        if step is None:
            while len(self._steps) >= KEPT_STEPS:
                self._steps.popitem(last=False)
            step = _Step(cache=self._new_cache(batch, length, device, dtype),
                         token=torch.zeros(batch, 1, device=device, dtype=torch.long),
                         position=torch.zeros(batch, 1, device=device, dtype=torch.long),
                         cache_position=torch.zeros(1, device=device, dtype=torch.long),
                         mask=torch.zeros(batch, 1, 1, length, device=device, dtype=dtype),
                         done=torch.zeros(batch, device=device, dtype=torch.bool),
                         out=torch.zeros(batch, length, device=device, dtype=torch.long),
                         index=torch.zeros(1, device=device, dtype=torch.long),
                         eos=_ids(eos, device), pad=torch.tensor(pad, device=device), banned=None)
        self._steps[key] = step
        return step

    @staticmethod
    def _pick(logits: torch.Tensor, done: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor,
              banned: torch.Tensor | None) -> torch.Tensor:
        """Greedy token (B,) as transformers picks it: `banned` ids at -inf, argmax (first of ties),
        finished sequences emit the pad id; marks (in `done`) sequences that emitted an end id."""
        logits = logits.float()
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        token = logits.argmax(-1)
        token = torch.where(done, pad, token)
        done |= (token[:, None] == eos[None, :]).any(-1)
        return token

    def _advance(self, step: _Step) -> None:
        """One token: forward the current token, pick the next, and move every input one position on."""
        logits = self._forward(step.token, step.mask, step.position, step.cache, step.cache_position)
        token = self._pick(logits, step.done, step.eos, step.pad, step.banned)
        step.out.index_copy_(1, step.index, token[:, None])
        step.index += 1
        step.token.copy_(token[:, None])
        step.position += 1
        step.cache_position += 1
        step.mask.index_fill_(3, step.cache_position, 0.0)

    def _run_step(self, step: _Step) -> None:
        """One token: a graph replay once recorded; else eagerly. The first eager step on CUDA runs
        with torch's sync debugging on: a forward that synchronizes with the host (data-dependent
        shapes, e.g. a mixture of experts that gathers its tokens) cannot be recorded, and the
        model then decodes eagerly (`graph_problem` says why). The third step is recorded."""
        if step.graph is not None:
            step.graph.replay()
            return
        cuda = step.token.device.type == "cuda"
        if cuda and step.eager_steps == 0 and self.graph_problem is None:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    self._advance(step)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            # torch's words for an op that synced ("called a synchronizing CUDA operation"), not its
            # notice that the debug mode is a prototype (also "synchroniz...", once per process)
            syncs = [w for w in seen if "called a synchronizing" in str(w.message)]
            if syncs:
                self.graph_problem = f"its forward synchronizes with the host ({str(syncs[0].message)[:80]})"
        else:
            self._advance(step)
        step.eager_steps += 1
        if cuda and step.eager_steps >= 2 and self.graph_problem is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._advance(step)  # recorded, not run: the inputs keep their values
            except RuntimeError as exc:  # nothing ran: decode on eagerly
                self.graph_problem = f"recording failed ({str(exc).splitlines()[0][:80]})"
                return
            step.graph = graph
            graph.replay()

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, eos: list[int],
               pad: int, suppress: list[int]) -> torch.Tensor:
        """input_ids (B, P) int64, attention_mask (B, P) (1 = token, 0 = padding) -> (B, P + T) int64,
        T <= new_tokens: T is new_tokens unless every sequence emitted an `eos` id before (then the
        step where the last one did). `suppress`: ids never picked (transformers' min_new_tokens with
        min >= new_tokens). Finished sequences continue with `pad`."""
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        position = mask.cumsum(-1) - 1  # as transformers numbers positions: padding skipped
        position.masked_fill_(mask == 0, 1)
        if self.static or (self.static is None and input_ids.device.type == "cuda"):
            out = self._decode_graphs(input_ids, mask, position, new_tokens, eos, pad, suppress)
        else:
            out = self._decode_eager(input_ids, mask, position, new_tokens, eos, pad, suppress)
        if eos and not suppress:
            ended = (out[:, :, None] == torch.tensor(eos, device=out.device)[None, None, :]).any(-1)
            if bool(ended.any(-1).all()):  # every sequence ended: transformers stops at the last end
                out = out[:, : int(ended.float().argmax(-1).max()) + 1]
        return torch.cat([input_ids, out], dim=-1)  # int64, as transformers returns (an int32 prompt promoted)

    def _decode_eager(self, input_ids, mask, position, new_tokens, eos, pad, suppress) -> torch.Tensor:
        """The CPU's loop (and CUDA's with `static` False): transformers' dynamic cache, no mask where
        nothing is padded (a static cache's masked attention cost the CPU ~20% a token, SmolLM2)."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.57
            cache = DynamicCache()
        device, (batch, prompt) = input_ids.device, input_ids.shape
        eos_t, pad_t = _ids(eos, device), torch.tensor(pad, device=device)
        done = torch.zeros(batch, device=device, dtype=torch.bool)
        full = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(batch, new_tokens)], dim=-1)
        logits = self._forward(input_ids, mask, position, cache, torch.arange(prompt, device=device))
        banned = _banned(suppress, logits.shape[-1], device)
        tokens = [self._pick(logits, done, eos_t, pad_t, banned)]
        position = mask.sum(-1, keepdim=True)
        for made in range(1, new_tokens):
            if eos and not suppress and bool(done.all()):
                break
            slot = prompt + made - 1
            logits = self._forward(tokens[-1][:, None], None if full is None else full[:, : slot + 1], position,
                                   cache, torch.tensor([slot], device=device))
            tokens.append(self._pick(logits, done, eos_t, pad_t, banned))
            position = position + 1
        self.last_path = "eager"
        return torch.stack(tokens, dim=1)

    def _decode_graphs(self, input_ids, mask, position, new_tokens, eos, pad, suppress) -> torch.Tensor:
        """CUDA: a static cache and the step replayed as one CUDA graph; the host syncs only to look
        for the end every CHECK_EVERY tokens."""
        batch, prompt = input_ids.shape
        device = input_ids.device
        length = -(-(prompt + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        dtype = self.model.get_input_embeddings()(input_ids[:1, :1]).dtype
        step = self._state(batch, length, device, dtype, eos, pad, suppress)
        step.cache.reset()
        logits = self._forward(input_ids, mask, position, step.cache, torch.arange(prompt, device=device))
        step.done.zero_()
        if step.banned is None and suppress:  # once per state: the recorded step reads this tensor
            step.banned = _banned(suppress, logits.shape[-1], device)
        first = self._pick(logits, step.done, step.eos, step.pad, step.banned)
        step.out[:, 0] = first
        step.index.fill_(1)
        step.token.copy_(first[:, None])
        step.position.copy_(mask.sum(-1, keepdim=True))  # the real tokens before it
        step.cache_position.fill_(prompt)
        minimum = torch.finfo(dtype).min
        step.mask.fill_(minimum)
        step.mask[:, 0, 0, :prompt] = torch.where(mask.bool(), 0.0, minimum)
        step.mask[:, 0, 0, prompt] = 0.0
        made = 1
        while made < new_tokens:
            if eos and not suppress and made % CHECK_EVERY == 0 and bool(step.done.all()):
                break
            self._run_step(step)
            made += 1
        self.last_path = "cuda graph" if step.graph is not None else "static, eager"
        return step.out[:, :made].clone()
