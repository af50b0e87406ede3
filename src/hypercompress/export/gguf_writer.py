"""`--format gguf`: one `model.gguf` that llama.cpp (and transformers' GGUF loader) runs.

The container, tensor names and metadata keys come from the `gguf` package (GGUFWriter,
get_tensor_name_map, SpecialVocab, gguf.quants); the metadata is what llama.cpp's
convert_hf_to_gguf.py writes for the architecture (LlamaModel / Qwen2Model / GPT2Model there):

| model_type | GGUF arch | notes |
|---|---|---|
| llama, mistral | llama | Q, K rows permuted as the converter does (`permute(w, n_head, n_head_kv)`); no sliding window, as there |
| qwen2 | qwen2 | no permutation (llama.cpp uses NeoX RoPE); q/k/v biases in F32 |
| gpt2 | gpt2 | Conv1D weights transposed to (out, in); position embeddings in F32 |

Tensors (export/gguf_tensors.py): a quant grid that a GGUF block type holds exactly (group size a
multiple of 32; 4-bit float zero -> Q4_1, symmetric 2..4-bit -> Q4_0, 5-bit -> Q5_x, 6..7-bit integer
zero and symmetric 6..8-bit -> Q8_0, and any grid whose GGUF dequantization reproduces the artifact's
float32 weight value for value) is re-packed code for code. Every other 2-D weight (other grids,
low-rank, sparse, dense float16) goes to `gguf_type` (--gguf-type) or else the smallest type with at
least the stored grid's bits (dense float16: F16, exact): the nearer of the grid's own codes with
float16-rounded minimums (integer-zero grids) and gguf.quants' re-quantization of the dense weight,
its relative Frobenius error reported; `force_type` applies `gguf_type` to every 2-D weight.
1-D tensors (norms, biases) are F32. A tied lm_head is not written (llama.cpp and transformers then
read token_embd.weight).

The tokenizer must be a byte-level BPE (tokenizer.ggml.model "gpt2"): tokens, token types, merges,
special ids and add-BOS/EOS flags are embedded; tokenizer.ggml.pre names llama.cpp's pre-tokenizer
for the tokenizer's own pre-tokenizer (ByteLevel alone: "gpt-2"; Digits + ByteLevel: "smollm"; the
Qwen2 and Llama-3 split regexes: "qwen2", "llama-bpe"). Anything else is refused with a UserError.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T, MODEL_ARCH

from ..errors import UserError
from .dense import densify
from .gguf_tensors import Encoded, encode, parse_type, permute_rows, quant_grid

FILE = "model.gguf"
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
              T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
# the split regexes of Qwen2's and Llama-3's tokenizer.json -> llama.cpp's pre-tokenizer names
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def gguf_arch(model_type: str) -> tuple[MODEL_ARCH, bool]:
    """(GGUF architecture, permute Q/K rows) of a model type, from the arch table (arch.py);
    UserError naming the exportable ones otherwise."""
    from ..arch import ARCHITECTURES

    spec = ARCHITECTURES.get(model_type)
    if spec is None or spec.gguf_arch is None:
        exportable = sorted(t for t, s in ARCHITECTURES.items() if s.gguf_arch)
        why = ("; no GGUF reader here reproduces a mixture of experts (transformers' loader ignores the experts' "
               "feed-forward length and top-k normalisation), so its file could not be checked"
               if spec is not None and spec.experts else "")
        raise UserError(f"architecture '{model_type}' cannot be exported to GGUF here{why}; "
                        f"supported: {', '.join(exportable)} (use --format hf for the others, then llama.cpp's "
                        "convert_hf_to_gguf.py)")
    return MODEL_ARCH[spec.gguf_arch], spec.gguf_permute_qk


def write(model, tokenizer, manifest: dict[str, Any], out_dir: Path, gguf_type: str | None = None,
          force_type: bool = False, **_: Any) -> dict[str, Any]:
    """Write `out_dir/model.gguf` for a loaded artifact (CPU, float32). `gguf_type` (F32, F16,
    BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): the type of every 2-D weight no GGUF type holds exactly
    (default: per tensor, see gguf_tensors.candidates); `force_type`: of every 2-D weight.

    Returns {file, bytes, file_type, tensors: {gguf name: {type, exact, rel_error, source}},
    exact, requantized, summary, notes (the largest re-quantization errors, one line each)}. `exact` means GGUF's dequantization gives the artifact's float32
    weight value for value; rel_error is ||W_gguf - W||_F / ||W||_F otherwise. Raises UserError for
    an architecture, rope scaling, tokenizer or gguf_type GGUF (or this writer) cannot hold.
    """
    config = model.config
    arch, permute = gguf_arch(config.model_type)
    requested = parse_type(gguf_type)
    rope = _rope(config) if arch != MODEL_ARCH.GPT2 else None
    vocab_size = int(config.vocab_size)
    vocab = _vocab(tokenizer, vocab_size, config)
    grids, bits = {}, {}
    for name, module in model.named_modules():
        kind = getattr(module, "kind", None)
        if kind in ("quant", "quant_embedding") and module.bits <= 8:
            grids[name], bits[name] = quant_grid(module), module.bits
        elif kind == "sparse" and module.bits <= 8:
            bits[name] = module.bits
    densify(model, torch.float32)
    encoded = _tensors(model, arch, permute, grids, bits, requested, force_type)

    counts = Counter()
    for enc, _ in encoded.values():
        if enc.data.ndim == 2:
            counts[enc.qtype] += int(np.prod(enc.data.shape[:-1])) * _row_elements(enc)
    file_type = FILE_TYPES[counts.most_common(1)[0][0]]
    path = Path(out_dir) / FILE
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type("model")
    name = Path(str(manifest.get("source_model") or "")).name.removesuffix(".gguf")
    if name:
        writer.add_name(name)
    _hparams(writer, config, arch, rope, vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, pre, special = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    for gguf_name, (enc, _) in encoded.items():
        raw = enc.qtype if enc.data.dtype == np.uint8 else None
        writer.add_tensor(gguf_name, enc.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return _report(encoded, path, file_type)


def _row_elements(enc: Encoded) -> int:
    if enc.data.dtype != np.uint8:
        return enc.data.shape[-1]
    block, size = gguf.GGML_QUANT_SIZES[enc.qtype]
    return enc.data.shape[-1] // size * block


def _tensors(model, arch, permute: bool, grids: dict, bits: dict, requested, force: bool) -> dict[str, tuple]:
    """Every tensor of the densified model -> {GGUF name: (Encoded, HF name)}, in state-dict order."""
    from ..modules import Conv1D

    config = model.config
    blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(arch, blocks)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out: dict[str, tuple] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and arch == MODEL_ARCH.GPT2:
            continue  # GPT-2's causal-mask buffers, skipped by the converter too
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"tensor {key} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}; "
                            "this artifact cannot be exported to GGUF (use --format hf)")
        if gguf_name == "output.weight" and tied:
            continue
        owner = key.rpartition(".")[0]
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and isinstance(model.get_submodule(owner), Conv1D):
            data = np.ascontiguousarray(data.T)  # Conv1D keeps (in, out); GGUF rows are outputs
        if data.ndim == 1 or gguf_name.startswith("position_embd"):
            enc = Encoded(T.F32, np.ascontiguousarray(data, dtype=np.float32), True, 0.0)
        else:
            enc = _wide(data, key, requested) or encode(data, bits.get(owner, 16), grids.get(owner), requested, force)
        if permute and gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
            enc.data = permute_rows(enc.data, heads, heads)
        elif permute and gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
            enc.data = permute_rows(enc.data, heads, kv_heads)
        out[gguf_name] = (enc, key)
    return out


F16_MAX = 65504.0  # the largest float16 (GGUF's F16 tensors and the scales of its block types)


def _wide(data: np.ndarray, key: str, requested: T | None) -> Encoded | None:
    """For `data` holding values float16 cannot (F16, and the float16 scales of the block types),
    before anything is cast: F32, which GGUF keeps per tensor, or a UserError naming the tensor when
    --gguf-type asked for a float16-based type. None for every other tensor (`encode` then)."""
    if float(np.abs(data).max(initial=0.0)) <= F16_MAX or requested in (T.F32, T.BF16):
        return None
    if requested is not None:
        raise UserError(f"tensor {key} holds values beyond float16's range (65504), which {requested.name} "
                        "stores with; pass --gguf-type F32 or BF16, or leave --gguf-type out")
    return Encoded(T.F32, np.ascontiguousarray(data, dtype=np.float32), True, 0.0)


def _rope(config) -> dict[str, Any]:
    """{theta, scaling factor or None} from config.rope_parameters (transformers 5) or rope_theta /
    rope_scaling; refuses scalings the converter needs extra tensors or keys for."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UserError(f"rope scaling '{kind}' is not written by the GGUF export (default and linear "
                        "only); use --format hf and llama.cpp's convert_hf_to_gguf.py")
    return {"theta": float(theta), "linear": float(params["factor"]) if kind == "linear" else None}


def _hparams(writer, config, arch, rope, vocab_size: int) -> None:
    """The hyperparameter keys convert_hf_to_gguf.py writes (TextModel, LlamaModel, GPT2Model)."""
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
    writer.add_rope_freq_base(rope["theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim != hidden // heads:  # llama.cpp's default is n_embd / n_head
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == MODEL_ARCH.LLAMA:
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if rope["linear"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["linear"])


def _pre_tokenizer(spec: dict[str, Any]) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre-tokenizer, None if unknown."""
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


def _vocab(tokenizer, vocab_size: int, config=None):
    """(tokens, token types, pre-tokenizer name, SpecialVocab with merges, special ids and add-BOS/EOS
    flags) as convert_hf_to_gguf.py's `_set_vocab_gpt2` builds them (special ids from the tokenizer,
    then, as the converter reads the model folder, from the model's config); ids the tokenizer does not use
    are "[PAD<id>]" tokens of type UNUSED. Raises UserError for a tokenizer GGUF's "gpt2" model
    cannot hold."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    what = type(tokenizer).__name__
    if backend is None:
        raise UserError(f"tokenizer {what} has no tokenizer.json (not a fast tokenizer); the GGUF export "
                        "needs a byte-level BPE tokenizer (use --format hf)")
    spec = json.loads(backend.to_str())
    model_kind = spec["model"]["type"]
    decoder = (spec.get("decoder") or {}).get("type")
    if model_kind != "BPE" or decoder != "ByteLevel":
        raise UserError(f"tokenizer {what} is a {model_kind} tokenizer (decoder {decoder}); GGUF export "
                        "writes byte-level BPE (GPT-2 style) tokenizers only (use --format hf)")
    pre = _pre_tokenizer(spec)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if pre is None or normalizer not in (None, "NFC"):
        shown = json.dumps(spec.get("pre_tokenizer"))[:120]
        raise UserError(f"tokenizer pre-tokenizer {shown} (normalizer {normalizer}) matches no llama.cpp "
                        "pre-tokenizer known here (gpt-2, smollm, qwen2, llama-bpe); use --format hf")
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(ids) >= vocab_size:
        raise UserError(f"tokenizer id {max(ids)} is beyond the model's vocab_size {vocab_size}; "
                        "re-create the artifact with a matching tokenizer")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(ids[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
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
    return tokens, types, pre, special


def _report(encoded: dict[str, tuple], path: Path, file_type) -> dict[str, Any]:
    tensors = {name: {"type": enc.qtype.name, "exact": enc.exact, "rel_error": enc.rel_error,
                      "source": source} for name, (enc, source) in encoded.items()}
    exact = [n for n, row in tensors.items() if row["exact"]]
    approx = [n for n, row in tensors.items() if not row["exact"]]
    types = lambda names: ", ".join(f"{t} x{c}" for t, c in sorted(Counter(tensors[n]["type"] for n in names).items()))
    summary = f"{len(exact)} tensors stored exactly ({types(exact) or 'none'})"
    if approx:
        worst = max(approx, key=lambda n: tensors[n]["rel_error"])
        summary += (f"; {len(approx)} re-quantized ({types(approx)}), relative error up to "
                    f"{tensors[worst]['rel_error']:.3g} ({worst})")
    size = path.stat().st_size
    summary += f"; {FILE} {size / 1e6:.1f} MB, file type {file_type.name}"
    worst = sorted(approx, key=lambda n: -tensors[n]["rel_error"])
    notes = [f"re-quantized {n} ({tensors[n]['source']}) to {tensors[n]['type']}: relative error "
             f"{tensors[n]['rel_error']:.3g}" for n in worst[:8]]
    notes += [f"... and {len(worst) - 8} more re-quantized tensors (see --json)"] if len(worst) > 8 else []
    return {"file": FILE, "bytes": size, "file_type": file_type.name, "tensors": tensors,
            "exact": len(exact), "requantized": len(approx), "summary": summary, "notes": notes}
