"""Decode that costs GPU time, not Python: a static KV cache, so that transformers' `generate`
compiles the one-token step (torch.compile, mode "reduce-overhead": CUDA graphs) and replays it.

HF generate with a dynamic cache is launch-bound on a GPU (about 3 ms of host time per step for 4
layers of a 7B-shaped model on an H200, measured), which hides every kernel's gain. With `cache_implementation = "static"`
transformers (>= 4.45) auto-compiles the decode step on CUDA (`GenerationConfig.compile_config`,
default mode "reduce-overhead"); our Triton kernels and torch's ops compile into it. The first
`generate` of each batch size and length compiles (20-45 s for SmolLM2 and an 8-layer
Llama-2-7B-shaped model on an H100), later ones replay.
`evaluate`'s lm-eval tasks decode with the dynamic cache (`dynamic_decode`): they generate once
per new length, and each longer batch would recompile the static step.
A user opts out per call (`model.generate(..., cache_implementation="dynamic")`) or for good
(`model.generation_config.cache_implementation = None`).
"""

from __future__ import annotations

from contextlib import contextmanager

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
