"""The hyperparameter keys of a GGUF file, as llama.cpp's convert_hf_to_gguf.py writes them (TextModel,
LlamaModel, GPT2Model, Gemma2Model, Gemma3Model), and the Gemma settings llama.cpp hard-codes
instead of reading (src/llama-model.cpp, load_hparams):

| GGUF arch | hard-coded in llama.cpp | a config that differs is refused |
|---|---|---|
| gemma2, gemma3 | queries scaled by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) at the 27B layer counts (46, 62); tanh-approximated GELU | query_pre_attn_scalar, hidden_activation |
| gemma2 | sliding-window attention on even layers (every 2nd global); attention and final soft-caps on (50 / 30 when the keys are absent); output layer = the embedding | layer_types, a cap of None, an untied head |
| gemma3 | 5 sliding layers, then 1 global; sliding layers use RoPE base 10000 unscaled; no soft-capping | layer_types, the sliding layers' RoPE, a soft-cap |

transformers' GGUF loader reads fewer keys still (not the soft-caps, query_pre_attn_scalar or the
layer pattern: it takes Gemma2Config's / Gemma3TextConfig's defaults), so only a model at those
defaults reads back there exactly.
"""

from __future__ import annotations

from typing import Any

import gguf
from gguf import MODEL_ARCH

from ..errors import UserError

GEMMAS = (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3)
SLIDING_PATTERN = {MODEL_ARCH.GEMMA2: 2, MODEL_ARCH.GEMMA3: 6}  # llama.cpp's set_swa_pattern(n)
LAYERS_27B = {MODEL_ARCH.GEMMA2: 46, MODEL_ARCH.GEMMA3: 62}     # llama.cpp's LLM_TYPE_27B, by block count
GEMMA3_LOCAL_THETA = 10000.0


def rope(config) -> dict[str, Any]:
    """{theta, linear (scaling factor or None), local (the sliding layers' RoPE parameters when the
    config gives them per layer type, Gemma 3)} from config.rope_parameters (transformers 5) or
    rope_theta / rope_scaling; refuses scalings the converter needs extra tensors or keys for."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    local = None
    if isinstance(params.get("full_attention"), dict):  # per layer type
        local = dict(params.get("sliding_attention") or {})
        params = dict(params["full_attention"])
    elif getattr(config, "rope_local_base_freq", None) is not None:  # Gemma 3 under transformers 4
        local = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UserError(f"rope scaling '{kind}' is not written by the GGUF export (default and linear "
                        "only); use --format hf and llama.cpp's convert_hf_to_gguf.py")
    return {"theta": float(theta), "linear": float(params["factor"]) if kind == "linear" else None,
            "local": local}


# Gemma settings llama.cpp honours (hard-coded or read) but transformers' GGUF loader never reads:
# it takes its config class's defaults for them (transformers.integrations.ggml.GGUF_CONFIG_MAPPING)
UNREAD_BY_TRANSFORMERS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")


def transformers_reader_notes(config, arch: MODEL_ARCH) -> list[str]:
    """One note per Gemma setting whose value differs from what transformers' GGUF loader would
    assume (its config class's default): such a file runs right in llama.cpp but not when
    transformers loads the GGUF itself."""
    if arch not in GEMMAS:
        return []
    defaults = type(config)()
    return [f"transformers' GGUF loader does not read {key} (it assumes {getattr(defaults, key)}, this model has "
            f"{getattr(config, key)}): llama.cpp runs the file as this model; in transformers load the artifact "
            "(hypercompress.load) instead of the GGUF" for key in UNREAD_BY_TRANSFORMERS
            if getattr(config, key, None) != getattr(defaults, key, None)]


def check_gemma(config, arch: MODEL_ARCH, rope_params: dict[str, Any], tied: bool) -> None:
    """UserError naming every setting of a Gemma 2 / 3 config that llama.cpp's architecture
    hard-codes otherwise (table above): its file would run a different model there."""
    if arch not in GEMMAS:
        return
    name = gguf.MODEL_ARCH_NAMES[arch]
    problems = []
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {activation} (llama.cpp: tanh-approximated GELU)")
    heads, blocks = config.num_attention_heads, config.num_hidden_layers
    scale_dim = config.hidden_size // heads if blocks == LAYERS_27B[arch] else config.head_dim
    if config.query_pre_attn_scalar != scale_dim:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp scales queries by "
                        f"1/sqrt({scale_dim}) at this shape)")
    n = SLIDING_PATTERN[arch]
    expected = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(blocks)]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and list(layer_types) != expected:
        problems.append(f"layer_types {list(layer_types)[:n]}... (llama.cpp: every {n}th layer global)")
    if not getattr(config, "sliding_window", None):
        problems.append("no sliding_window (llama.cpp's sliding layers need one)")
    attn_cap, final_cap = config.attn_logit_softcapping, config.final_logit_softcapping
    if arch == MODEL_ARCH.GEMMA2:
        if attn_cap is None or final_cap is None:
            problems.append("a soft-cap of None (llama.cpp's gemma2 always caps attention and logits)")
        if not tied:
            problems.append("an untied lm_head (llama.cpp's gemma2 uses the embedding as its output layer)")
    else:
        if attn_cap or final_cap:
            problems.append("soft-capping (llama.cpp's gemma3 caps nothing)")
        local = rope_params["local"] or {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_THETA}
        if local.get("rope_type", "default") != "default" or float(local.get("rope_theta", 0)) != GEMMA3_LOCAL_THETA:
            problems.append(f"sliding-layer RoPE {local} (llama.cpp: base {GEMMA3_LOCAL_THETA:g}, unscaled)")
        if getattr(config, "use_bidirectional_attention", False):
            problems.append("bidirectional attention (llama.cpp's gemma3 is causal)")
    if problems:
        raise UserError(f"this {config.model_type} cannot be exported to GGUF: llama.cpp's {name} hard-codes "
                        f"other settings than its {'; '.join(problems)}; use --format hf")


def write(writer: gguf.GGUFWriter, config, arch: MODEL_ARCH, rope_params: dict[str, Any] | None,
          vocab_size: int) -> None:
    """The hyperparameter keys convert_hf_to_gguf.py writes for `arch`."""
    if arch == MODEL_ARCH.GPT2:
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)  # rows of position_embd (n_ctx may differ)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(getattr(config, "n_inner", None) or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads, hidden = config.num_attention_heads, config.hidden_size
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(rope_params["theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim != hidden // heads or arch in GEMMAS:  # llama.cpp's default is n_embd / n_head
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == MODEL_ARCH.LLAMA:
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch in GEMMAS:
        writer.add_sliding_window(config.sliding_window)
    if arch == MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if rope_params["linear"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_params["linear"])
