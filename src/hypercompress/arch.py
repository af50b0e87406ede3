"""The per-architecture table: where the blocks are, which linears each block holds, how it
normalizes and what each export calls it.

Architectures differ only here; every other file is architecture-agnostic. A new family is one row
(checklist: docs/new_family.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                 # dotted path of the nn.ModuleList of transformer blocks
    linears: tuple[str, ...]    # linear layers inside one block, relative names
    final_norm: str             # dotted path of the norm between the last block and lm_head
    conv1d: bool = False        # GPT-2's Conv1D keeps weights as (in_features, out_features)
    # structured pruning (methods/structured): which linears carry MLP channels and attention heads
    mlp_up: tuple[str, ...] = ()        # their output rows are the MLP channels
    mlp_gate_up: str = ""               # one fused linear whose rows are [gate channels; up channels] (Phi-3)
    mlp_down: str = ""                  # its input columns are the MLP channels
    attention: tuple[str, str, str, str] | None = None  # separate q, k, v, o projections (GQA-aware)
    layers_key: str = "num_hidden_layers"      # config keys rewritten when blocks / channels go
    intermediate_key: str = "intermediate_size"
    # model surgery (analysis/erasure): every module that adds to the residual stream
    residual_writers: tuple[str, ...] = ()     # inside one block: its output rows live in the residual
    embeddings: tuple[str, ...] = ()           # dotted paths of the embedding tables (token first)
    # normalization: "rms" (RMSNorm, no mean subtracted) or "layer" (LayerNorm); pre-norm blocks whose
    # norms' outputs are read by these linears (rotation folds each norm's scale into its readers)
    norm: str = "rms"
    norm_offset: float = 0.0           # a norm scales by norm_offset + weight (Gemma: 1, its weight stored as w - 1)
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    head_norms: tuple[str, ...] = ()   # (q norm, k norm) after q/k_proj (Qwen3, OLMo-2); a rotation of
                                       # the residual leaves their inputs alone
    head_norm_span: str = "head"       # "head": over each head's head_dim (Qwen3); "all": over the whole
                                       # projection, every head together (OLMo-2: heads cannot be pruned)
    # GGUF: gguf.MODEL_ARCH member, and whether Q/K rows are permuted as convert_hf_to_gguf.py's LlamaModel does
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False
    # kv_lowrank's latent attention (layers/latent_kv.py) reproduces this family's attention: separate
    # q/k/v/o, RoPE over whole heads, every layer global, scores not capped (Phi-2, Gemma: no)
    latent_kv: bool = True
    # a mixture of experts: the relative name of a sparse MLP's fused experts in a block (transformers'
    # gate_up_proj (E, 2I, D) and down_proj (E, D, I)), which experts.py turns into one linear per expert
    # matrix ("{experts}.{e}.gate_up_proj", "{experts}.{e}.down_proj"); the router beside them is not a
    # linear of the block, so no stage selects it and it is stored in 16 bits
    experts: str = ""

    @property
    def rotatable(self) -> bool:
        """Whether a rotation of the residual stream folds in exactly (methods/rotation.py): RMSNorm
        pre-norm blocks whose norm readers are known."""
        return self.norm == "rms" and bool(self.norm_readers)


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ),
    final_norm="model.norm",
    mlp_up=("mlp.gate_proj", "mlp.up_proj"),
    mlp_down="mlp.down_proj",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    embeddings=("model.embed_tokens",),
    norm_readers=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    gguf_arch="LLAMA", gguf_permute_qk=True,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": replace(_LLAMA_LIKE, gguf_arch="QWEN2", gguf_permute_qk=False),
    "qwen3": replace(_LLAMA_LIKE, head_norms=("self_attn.q_norm", "self_attn.k_norm"), gguf_arch="QWEN3",
                     gguf_permute_qk=False),
    # OLMo-2: norms after the sublayers (post_attention_layernorm, post_feedforward_layernorm), so no
    # linear reads a norm (nothing to rotate) and o_proj / down_proj outputs are normalized before the
    # residual add (no exact residual writers for surgery); q/k norms over all heads; transformers'
    # GGUF loader does not read olmo2, so the GGUF export is not offered
    "olmo2": replace(_LLAMA_LIKE, norm_readers=(), residual_writers=(), head_norms=("self_attn.q_norm", "self_attn.k_norm"),
                     head_norm_span="all", gguf_arch=None, gguf_permute_qk=False),
    # Gemma 2 / Gemma 3 (text): a norm after each sublayer as well as before ("sandwich": o_proj's and
    # down_proj's outputs are normalized before the residual add, so nothing rotates exactly and no
    # linear writes the residual directly); RMSNorm scales by 1 + weight (stored as w - 1: no table
    # code reads a norm's weight once no linear reads a norm); the embedding scales its rows by
    # sqrt(hidden) in its forward (modules.carry_embedding_scale hands that to a compressed embedding);
    # Gemma 2 soft-caps its logits (modules.head_logits) and attention scores, both alternate sliding-
    # window and global layers (kv_lowrank's latent attention reproduces neither); Gemma 3 adds per-head
    # q/k norms; GGUF stores each norm's whole scale (1 + w) and llama.cpp hard-codes the layer pattern
    # and attention scale (exporters/gguf_hparams.check_gemma refuses configs that differ)
    "gemma2": replace(_LLAMA_LIKE, norm_readers=(), residual_writers=(), norm_offset=1.0, gguf_arch="GEMMA2",
                      gguf_permute_qk=False, latent_kv=False),
    "gemma3_text": replace(_LLAMA_LIKE, norm_readers=(), residual_writers=(), norm_offset=1.0, gguf_arch="GEMMA3",
                           gguf_permute_qk=False, latent_kv=False, head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    # Phi-3 / Phi-4-mini: q, k, v fused in qkv_proj (no head pruning, no kv_lowrank: attention=None),
    # gate and up fused in gate_up_proj (rows [gate; up], each intermediate_size)
    "phi3": ArchSpec(
        blocks="model.layers",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        final_norm="model.norm",
        mlp_gate_up="mlp.gate_up_proj",
        mlp_down="mlp.down_proj",
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        embeddings=("model.embed_tokens",),
        norm_readers=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        gguf_arch="PHI3",
    ),
    # Phi-2 / Phi-1.5: attention and MLP in parallel from one LayerNorm (biases everywhere, the head's
    # too), RoPE over part of each head; transformers' GGUF loader does not read phi2
    "phi": ArchSpec(
        blocks="model.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
        final_norm="model.final_layernorm",
        mlp_up=("mlp.fc1",),
        mlp_down="mlp.fc2",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
        residual_writers=("self_attn.dense", "mlp.fc2"),
        embeddings=("model.embed_tokens",),
        norm="layer",
        latent_kv=False,
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        final_norm="transformer.ln_f",
        conv1d=True,
        mlp_up=("mlp.c_fc",),
        mlp_down="mlp.c_proj",
        layers_key="n_layer",
        intermediate_key="n_inner",
        residual_writers=("attn.c_proj", "mlp.c_proj"),
        embeddings=("transformer.wte", "transformer.wpe"),
        norm="layer",
        gguf_arch="GPT2",
    ),
}

# Mixtures of experts (Mixtral, Qwen3-MoE, OLMoE): attention as their dense relatives, the MLP a router
# over experts. Block linears: the attention's, a dense block's MLP (Qwen3-MoE's mlp_only_layers), and
# every expert's two (experts.py). Not rotated (the router and every expert read the post-attention
# norm: not folded here), no MLP channel pruning, no edits (the experts write the residual per token
# as routed), no GGUF export (no reader here reproduces experts: exporters/gguf_writer.gguf_arch says so).
_MOE = replace(_LLAMA_LIKE, mlp_up=(), mlp_down="", residual_writers=(), norm_readers=(), gguf_arch=None,
               gguf_permute_qk=False, experts="mlp.experts")
ARCHITECTURES.update({
    "mixtral": _MOE,
    "qwen3_moe": replace(_MOE, head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    "olmoe": replace(_MOE, head_norms=("self_attn.q_norm", "self_attn.k_norm"), head_norm_span="all"),
})


def rotatable_types() -> list[str]:
    """The model types whose residual stream can be rotated (ArchSpec.rotatable), sorted."""
    return sorted(t for t, spec in ARCHITECTURES.items() if spec.rotatable)


def norm_of(spec: ArchSpec, reader: str) -> str | None:
    """The norm (relative name) whose output the block linear `reader` reads, or None."""
    return next((norm for norm, readers in spec.norm_readers if reader in readers), None)


def arch_of(model_type: str) -> ArchSpec:
    """The table entry for a config's `model_type`, or a UserError listing the supported ones."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))}"
            " (add a row to hypercompress.arch.ARCHITECTURES)"
        )
    return ARCHITECTURES[model_type]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model.config.model_type).blocks)


def block_linear_names(model: nn.Module) -> list[str]:
    """Full names of every block linear, in block order: e.g. model.layers.3.mlp.up_proj; in a
    mixture of experts the linears each block has (a sparse or a dense MLP) and, once experts.py
    unfused them, every expert's: model.layers.3.mlp.experts.5.down_proj."""
    spec = arch_of(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    if not spec.experts:
        return [f"{spec.blocks}.{i}.{leaf}" for i in range(len(blocks)) for leaf in spec.linears]
    names = []
    for i, block in enumerate(blocks):
        prefix = f"{spec.blocks}.{i}."
        names += [prefix + leaf for leaf in spec.linears if submodule_or_none(block, leaf)]
        experts = submodule_or_none(block, spec.experts)
        if isinstance(experts, nn.ModuleList):  # unfused (experts.ExpertLinears)
            names += [f"{prefix}{spec.experts}.{e}.{leaf}" for e in range(len(experts))
                      for leaf in ("gate_up_proj", "down_proj")]
    return names


def submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    """model.get_submodule(name), or None when there is no such module."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def residual_writer_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(embedding tables, block writers): the full names of every module whose output is added to
    the residual stream, e.g. (["model.embed_tokens"], ["model.layers.0.self_attn.o_proj", ...])."""
    spec = arch_of(model.config.model_type)
    if not spec.residual_writers:
        why = ("routes each token to its own experts, which write the residual stream" if spec.experts else
               "normalizes its sublayers' outputs before adding them to the residual stream (post-norm)")
        raise UserError(f"{model.config.model_type} {why}, so an edit folded into its linears would not stay exact; "
                        f"edits support {', '.join(sorted(t for t, s in ARCHITECTURES.items() if s.residual_writers))}")
    count = len(model.get_submodule(spec.blocks))
    return list(spec.embeddings), [f"{spec.blocks}.{i}.{leaf}" for i in range(count) for leaf in spec.residual_writers]


# config keys that bound the tokens of one forward pass (GPT-2's n_positions is aliased by
# max_position_embeddings in transformers; the others are read when a config has only them)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(config) -> int | None:
    """The most tokens one forward pass of a model with this config may hold (its position
    embeddings or RoPE range: `max_position_embeddings`, GPT-2's `n_positions`), or None when the
    config states no limit. The one place every length check reads it, for every architecture."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(config, length: int, option: str) -> None:
    """UserError naming `option` and the limit when `length` tokens exceed the model's position
    limit (position_limit), before any work is done with windows that long."""
    limit = position_limit(config)
    if limit is not None and length > limit:
        raise UserError(f"{option} {length} is longer than the model's position limit of {limit} tokens "
                        f"(max_position_embeddings); pass {option} {limit} or less")
