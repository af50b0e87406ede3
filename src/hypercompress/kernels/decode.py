"""Decode that costs GPU time, not Python.

Plain greedy `generate` calls (no sampling, beams, logits processors, streamers or extra outputs;
`max_new_tokens` given, no right padding) go to our own loop (greedy.py): on CUDA a static KV cache
and the step recorded once as a CUDA graph and replayed, so a token costs its kernels and no host
time; on the CPU one eager forward a token over the dynamic cache. Its
outputs equal transformers' greedy search (tests). Every other call goes to transformers' `generate`:
on CUDA with `cache_implementation = "static"`, so that transformers (>= 4.45) compiles its decode
step (torch.compile "reduce-overhead", 20-45 s at the first call of each shape for SmolLM2 and an
8-layer Llama-2-7B-shaped model on an H100).

HF generate with a dynamic cache is launch-bound on a GPU (about 3 ms of host time per step for 4
layers of a 7B-shaped model on an H200, measured); with its compiled step an 8-layer 7B-shaped model
still took ~3 ms a step at batch 1 and at 16 on an H100, over twice the time its weights take to
read, which hid every kernel's gain.
`evaluate`'s lm-eval tasks decode with the dynamic cache (`dynamic_decode`): they generate once
per new length, and each longer batch would recompile the static step.
A user opts out of our loop per call (`model.generate(..., cache_implementation="dynamic")` goes to
transformers) or for good (`del model.generate`).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

STATIC_DECODE = "static KV cache + compiled decode step (torch.compile reduce-overhead: CUDA graphs)"


def use_static_decode(model: nn.Module) -> str | None:
    """Make `model.generate` decode with a static cache and the compiled step when the model sits on
    CUDA and its class compiles whole (`_can_compile_fullgraph`); returns what was set (also kept as
    `model.hypercompress_decode`), or None where nothing changed (CPU: the compiled step took 40 s to
    compile and recompiled per generation length for a 20% faster step, SmolLM2 on a busy 2-core
    CPU, stop 42; classes transformers does not compile;
    no working Triton, which inductor needs for the CUDA step)."""
    config = getattr(model, "generation_config", None)
    device = next((t.device for t in model.parameters()), None)
    if config is None or device is None or device.type != "cuda":
        return None
    if not getattr(model, "_can_compile_fullgraph", False):
        return None
    from torch.utils._triton import has_triton

    if not has_triton():  # inductor compiles the CUDA step through Triton: without it, stay eager
        return None
    config.cache_implementation = "static"
    model.hypercompress_decode = STATIC_DECODE
    return STATIC_DECODE


@contextmanager
def dynamic_decode(model: nn.Module):
    """Within the block `model.generate` decodes with the dynamic cache (eager), then the setting
    comes back. For callers that generate once per new length, such as lm-eval's generate_until:
    there a static cache would recompile the step at every longer batch (torch.compile's shapes are
    static), for tokens that are each decoded once."""
    config = getattr(model, "generation_config", None)
    saved = getattr(config, "cache_implementation", None)
    if config is not None and saved == "static":
        config.cache_implementation = None
    try:
        yield model
    finally:
        if config is not None and saved == "static":
            config.cache_implementation = saved


GREEDY_GRAPH = "greedy: our loop over a static KV cache, each step one CUDA graph replay (kernels/greedy.py)"
GREEDY_EAGER = "greedy: our loop over transformers' dynamic KV cache, eager (kernels/greedy.py)"
# generate's arguments that are no generation setting; any of them given sends the call to transformers
_HF_ONLY = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
            "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "tokenizer",
            "trust_remote_code", "assistant_tokenizer", "use_model_defaults")
_OUTPUT_FLAGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                 "output_hidden_states")


def greedy_unsupported(model: nn.Module) -> str | None:
    """Why our greedy loop cannot serve this model (None: it can): it needs a decoder-only class
    that supports a static cache (`_can_compile_fullgraph`) with full causal attention in every layer
    (one mask serves them all)."""
    config = getattr(model, "config", None)
    if getattr(model, "generation_config", None) is None or config is None:
        return "no generation config"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not support transformers' static cache"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layers of kinds {sorted(kinds - {'full_attention'})}"
    if not getattr(config, "is_causal", True):
        return "bidirectional attention"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"a sliding attention window ({config.sliding_window})"  # its static cache keeps only the window
    return None


def plain_greedy(model: nn.Module, args: tuple, kwargs: dict) -> dict | str:
    """The arguments of GreedyDecoder.decode for a `generate(*args, **kwargs)` call that transformers
    would run as plain greedy search, resolved as transformers resolves them (generation config,
    special tokens, inferred attention mask, logits processors, stopping criteria); else a
    one-line reason why the call goes to transformers. Only calls with `max_new_tokens` are taken
    (transformers versions disagree on what a bare max_length means)."""
    try:
        from transformers.generation import LogitsProcessorList, StoppingCriteriaList
        from transformers.generation.configuration_utils import GenerationMode

        if len(args) > 2:
            return "more than two positional arguments"
        kwargs = dict(kwargs)
        inputs = args[0] if args else kwargs.pop("inputs", None)
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        generation_config = args[1] if len(args) == 2 else kwargs.pop("generation_config", None)
        for name in _HF_ONLY:
            if kwargs.pop(name, None) is not None:
                return f"{name} given"
        if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and not inputs.is_floating_point()
                and inputs.shape[0] > 0 and inputs.shape[1] > 0):
            return "inputs are not a (batch, length) tensor of token ids"
        device = next((p.device for p in model.parameters()), inputs.device)
        if inputs.device != device:
            return f"inputs on {inputs.device}, the model on {device}"
        config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
        mask = model_kwargs.pop("attention_mask", None)
        if model_kwargs:
            return f"model inputs {sorted(model_kwargs)}"
        if config.get_generation_mode() != GenerationMode.GREEDY_SEARCH:
            return f"{config.get_generation_mode().value}, not greedy search"
        if config.cache_implementation not in (None, "static"):
            return f"cache_implementation={config.cache_implementation!r}"
        flags = [flag for flag in _OUTPUT_FLAGS if getattr(config, flag, None)]
        if flags or (config.num_return_sequences or 1) != 1 or config.use_cache is False:
            return ", ".join(flags) or "num_return_sequences or use_cache=False"
        if getattr(config, "stop_strings", None) is not None or getattr(config, "max_time", None) is not None:
            return "stop_strings or max_time"
        new = config.max_new_tokens
        if type(new) is not int or new < 1:  # None, a float, a bool, ...: as transformers makes of it
            return "no max_new_tokens" if new is None else f"max_new_tokens={new!r}"
        batch, prompt = inputs.shape
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != inputs.shape):
            return "attention_mask is not (batch, length)"
        try:  # transformers 5.2x: the batch size decides whether a missing mask is warned about
            model._prepare_special_tokens(config, mask is not None, device=inputs.device, batch_size=batch)
        except TypeError:
            model._prepare_special_tokens(config, mask is not None, device=inputs.device)
        eos = [] if config._eos_token_tensor is None else [int(t) for t in config._eos_token_tensor.flatten()]
        pad = None if config._pad_token_tensor is None else int(config._pad_token_tensor)
        if mask is None:  # as transformers infers it: padding where the pad id (not an end id) appears
            mask = inputs.ne(pad) if pad is not None and pad not in eos and bool((inputs == pad).any()) \
                else torch.ones_like(inputs)
        if not bool(mask[:, -1].all()):  # right padding: transformers versions number what follows differently
            return "right-padded attention_mask"
        config.max_length = prompt + new  # as transformers' _prepare_generated_length sets them
        if config.min_new_tokens is not None:
            config.min_length = prompt + config.min_new_tokens
        suppress = []
        for processor in model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt,
                                                     encoder_input_ids=inputs, device=inputs.device,
                                                     logits_processor=LogitsProcessorList(),
                                                     model_kwargs={"attention_mask": mask}):
            name = type(processor).__name__
            if (name == "MinNewTokensLengthLogitsProcessor" and processor.min_new_tokens >= new) or \
                    (name == "MinLengthLogitsProcessor" and processor.min_length >= prompt + new):
                suppress = eos  # the end ids are never picked within max_new_tokens
            else:
                return f"logits processor {name}"
        for criterion in model._get_stopping_criteria(generation_config=config,
                                                      stopping_criteria=StoppingCriteriaList()):
            if type(criterion).__name__ not in ("MaxLengthCriteria", "EosTokenCriteria"):
                return f"stopping criterion {type(criterion).__name__}"
        return {"input_ids": inputs, "attention_mask": mask, "new_tokens": new, "eos": eos,
                "pad": 0 if pad is None else pad, "suppress": suppress}
    except Exception as exc:  # whatever transformers would make of it, it makes of it itself
        return f"not resolved here ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def greedy_generate(model: nn.Module, *args, **kwargs):
    """`model.generate` once `use_fast_decode` installed it: plain greedy calls through our loop,
    the rest through transformers' generate. `model.hypercompress_greedy.last_path` says which."""
    decoder = model.hypercompress_greedy
    plan = plain_greedy(model, args, kwargs)
    if isinstance(plan, str):
        decoder.last_path = f"transformers ({plan})"
        return type(model).generate(model, *args, **kwargs)
    return decoder.decode(**plan)


def use_fast_decode(model: nn.Module) -> str:
    """Set up `model.generate` as `load` serves it: plain greedy calls through our loop (greedy.py;
    where `greedy_unsupported` allows), the rest through transformers' generate, which on CUDA
    decodes with a static cache and a compiled step (`use_static_decode`). Returns the description,
    also kept as `model.hypercompress_decode`."""
    from .greedy import GreedyDecoder

    hf = f"transformers' generate, {use_static_decode(model) or 'dynamic cache, eager'}"
    reason = greedy_unsupported(model)
    if reason is not None:
        description = f"{hf} (our loop: {reason})"
    else:
        model.hypercompress_greedy = GreedyDecoder(model)
        model.generate = partial(greedy_generate, model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        description = f"{GREEDY_GRAPH if device.type == 'cuda' else GREEDY_EAGER}; other calls: {hf}"
    model.hypercompress_decode = description
    return description
