"""`--format gguf`: one `model.gguf` that llama.cpp (and transformers' GGUF loader) runs.

The container, tensor names and metadata keys come from the `gguf` package (GGUFWriter,
get_tensor_name_map, SpecialVocab, gguf.quants); the metadata is what llama.cpp's
convert_hf_to_gguf.py writes for the architecture (LlamaModel / Qwen2Model / GPT2Model there):

| model_type | GGUF arch | notes |
|---|---|---|
| llama, mistral | llama | Q, K rows permuted as the converter does (`permute(w, n_head, n_head_kv)`); no sliding window, as there |
| qwen2 | qwen2 | no permutation (llama.cpp uses NeoX RoPE); q/k/v biases in F32 |
| gpt2 | gpt2 | Conv1D weights transposed to (out, in); position embeddings in F32 |
| gemma2, gemma3_text | gemma2, gemma3 | norms stored as 1 + w (Gemma2Model / Gemma3Model there); head_dim, sliding window and Gemma 2's soft-caps as keys; configs llama.cpp would run differently refused (exporters/gguf_hparams.py) |

Tensors (exporters/gguf_tensors.py): a quant grid that a GGUF block type holds exactly (group size a
multiple of 32; 4-bit float zero -> Q4_1, symmetric 2..4-bit -> Q4_0, 5-bit -> Q5_x, 6..7-bit integer
zero and symmetric 6..8-bit -> Q8_0, and any grid whose GGUF dequantization reproduces the artifact's
float32 weight value for value) is re-packed code for code. Every other 2-D weight (other grids,
low-rank, sparse, dense float16) goes to `gguf_type` (--gguf-type) or else the smallest type with at
least the stored grid's bits (dense float16: F16, exact): the nearer of the grid's own codes with
float16-rounded minimums (integer-zero grids) and gguf.quants' re-quantization of the dense weight,
its relative Frobenius error reported; `force_type` applies `gguf_type` to every 2-D weight.
1-D tensors (norms, biases) are F32. A tied lm_head is not written (llama.cpp and transformers then
read token_embd.weight).

The tokenizer (exporters/gguf_vocab.py) must be a byte-level BPE (tokenizer.ggml.model "gpt2", with
tokenizer.ggml.pre naming llama.cpp's pre-tokenizer: ByteLevel alone "gpt-2", Digits + ByteLevel
"smollm", the Qwen2 and Llama-3 split regexes "qwen2", "llama-bpe") or a SentencePiece BPE with byte
fallback (Llama-2, Mistral, Gemma: "llama", with scores in merge order); tokens, token types, merges,
special ids and add-BOS/EOS flags are embedded. Anything else is refused with a UserError.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T, MODEL_ARCH

from ..errors import UserError
from . import gguf_hparams, gguf_vocab
from .dense import densify
from .gguf_tensors import Encoded, encode, parse_type, permute_rows, quant_grid

FILE = "model.gguf"
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
              T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}



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
          force_type: bool = False) -> dict[str, Any]:
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
    rope = gguf_hparams.rope(config) if arch != MODEL_ARCH.GPT2 else None
    vocab_size = int(config.vocab_size)
    vocab = gguf_vocab.vocab(tokenizer, vocab_size, config)
    grids, bits = {}, {}
    for name, module in model.named_modules():
        kind = getattr(module, "kind", None)
        if kind in ("quant", "quant_embedding") and module.bits <= 8:
            grids[name], bits[name] = quant_grid(module), module.bits
        elif kind == "sparse" and module.bits <= 8:
            bits[name] = module.bits
    densify(model, torch.float32)
    tied = _tied(model)
    gguf_hparams.check_gemma(config, arch, rope, tied)
    encoded = _tensors(model, arch, permute, tied, grids, bits, requested, force_type)

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
    gguf_hparams.write(writer, config, arch, rope, vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    for gguf_name, (enc, _) in encoded.items():
        raw = enc.qtype if enc.data.dtype == np.uint8 else None
        writer.add_tensor(gguf_name, enc.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = _report(encoded, path, file_type)
    report["notes"] += gguf_hparams.transformers_reader_notes(config, arch)
    return report


def _row_elements(enc: Encoded) -> int:
    if enc.data.dtype != np.uint8:
        return enc.data.shape[-1]
    block, size = gguf.GGML_QUANT_SIZES[enc.qtype]
    return enc.data.shape[-1] // size * block


def _tied(model) -> bool:
    """Whether the densified model's output layer is its embedding table (one tensor)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _tensors(model, arch, permute: bool, tied: bool, grids: dict, bits: dict, requested,
             force: bool) -> dict[str, tuple]:
    """Every tensor of the densified model -> {GGUF name: (Encoded, HF name)}, in state-dict order."""
    from ..arch import arch_of
    from ..layers.base import Conv1D

    config = model.config
    blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(arch, blocks)
    embed_ptr = model.get_input_embeddings().weight.data_ptr()
    embed_key = next(k for k, t in model.state_dict().items() if t.data_ptr() == embed_ptr)
    norm_offset = arch_of(config.model_type).norm_offset  # llama.cpp stores a norm's whole scale (Gemma: 1 + w)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out: dict[str, tuple] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and arch == MODEL_ARCH.GPT2:
            continue  # GPT-2's causal-mask buffers, skipped by the converter too
        if tied and key != embed_key and tensor.data_ptr() == embed_ptr:
            continue  # the tied head: llama.cpp and transformers read token_embd.weight
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"tensor {key} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}; "
                            "this artifact cannot be exported to GGUF (use --format hf)")
        owner = key.rpartition(".")[0]
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and isinstance(model.get_submodule(owner), Conv1D):
            data = np.ascontiguousarray(data.T)  # Conv1D keeps (in, out); GGUF rows are outputs
        if norm_offset and data.ndim == 1 and key.endswith("norm.weight"):
            data = data + np.float32(norm_offset)
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
    notes += [f"... and {len(worst) - 8} more re-quantized tensors (each one's type and error: the report's "
              "\"tensors\", written by --json FILE)"] if len(worst) > 8 else []
    return {"file": FILE, "bytes": size, "file_type": file_type.name, "tensors": tensors,
            "exact": len(exact), "requantized": len(approx), "summary": summary, "notes": notes}
