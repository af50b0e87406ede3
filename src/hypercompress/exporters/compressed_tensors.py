"""`--format compressed-tensors`: packed int4/int8 weights + `quantization_config`, as vLLM and
transformers (with the `compressed-tensors` package) load them, the layout llm-compressor saves with
`save_compressed=True` ("pack-quantized").

Every quantized linear NAME (our `quant` kind, integer or symmetric grid) is written with
compressed-tensors' own functions (`pack_to_int32`, its QuantizationArgs / QuantizationScheme /
QuantizationConfig models and ModelCompressor.update_config) as

  NAME.weight_packed      int32 (out, ceil(in * B / 32))  signed B-bit codes q', 32/B per word
  NAME.weight_scale       DTYPE (out, in / group)          (out, 1) for one scale per row ("channel")
  NAME.weight_zero_point  int32 (ceil(out * B / 32), in / group)  signed zero points z', packed along
                          rows; only for asymmetric grids
  NAME.weight_shape       int64 (2,)                       [out, in]
  NAME.bias               DTYPE (out,)                     when the layer has one

compressed-tensors dequantizes W = (q' - z') s (symmetric: q' s). Our codes q in [0, 2^b) with
W = (q - z) s (or (q - 2^(b-1)) s) go in as q' = q - 2^(b-1), z' = z - 2^(b-1), so (q' - z') s is
our (q - z) s to the bit. b = 2..4 is stored as B = 4 (the codes fit, nothing is re-quantized),
b = 5..8 as B = 8 (vLLM's kernels take 4 and 8). Each packed module is decompressed again with
compressed-tensors' PackedQuantizationCompressor and compared bit for bit with our own dequantized
weight before anything is saved. Scales are our float16 scales, exact with DTYPE float16 (the
default) or float32; bfloat16 rounds them once (the report says so).

Layers of one grid (B, group size, symmetric) form one config group; one group holding every
quantized nn.Linear targets "Linear" (as llm-compressor writes), several groups (mixed bits from the
planner) target their exact module names (the report notes q/k/v or gate/up split across schemes:
vLLM fuses those and refuses that). `ignore` lists every linear left dense (lm_head) and every dense
fallback. `actorder` is "static" for an artifact made by GPTQ with act_order alone (metadata only).
Tensors outside quantized linears (embeddings, norms, lm_head) are written in DTYPE.

Loading: vLLM reads this layout as llm-compressor's. transformers (5.17 .. 5.24 with compressed-tensors
0.19 .. 0.20) loads symmetric files as they are, but refuses every asymmetric pack-quantized file,
llm-compressor's own included (its meta-device compress leaves the zero points unpacked, so their
shape differs from the file's); `from_pretrained(DIR,
quantization_config=CompressedTensorsConfig(dequantize=True))` loads those (one config group only).
`symmetric=True` writes an asymmetric grid in its symmetric form instead, q' = q - z with no zero
point: (q - z) s is the same weight to the bit, and q - z always fits the B-bit signed field for
b = 2, 3 (B = 4) and b = 5..7 (B = 8); for b = 4 and 8 only when every code lies within 2^(B-1) - 1
of its zero point (else refused by name: nothing is re-quantized).

Refused with a one-line UserError (nothing written): float-zero grids (w = q s + m; `--format gguf`
holds them), quantized embeddings (compressed-tensors and vLLM do not quantize embeddings), GPT-2's
Conv1D layers, and every other kind (sparse: the installed compressed-tensors has no 2:4 compressor
that composes with pack-quantized; low-rank, KAN, generated, latent-KV: `--format hf`), unless
`dense_fallback=True`: then those modules are written dense in DTYPE and listed in `ignore`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..formats.packing import unpack_codes
from ..layers.base import CompressedModule, StoredModule
from .dense import check_range, densify

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT = "pack-quantized"


def write(model, tokenizer, manifest: dict[str, Any], out_dir: Path, dtype: str = "float16",
          dense_fallback: bool = False, symmetric: bool = False) -> dict[str, Any]:
    """Write `model` (an artifact as `artifact.load` returns it) to `out_dir` in compressed-tensors'
    pack-quantized layout: model.safetensors, config.json with `quantization_config`, tokenizer.

    dtype: "float16" (default: our scales and 16-bit tensors go in exactly), "bfloat16" or "float32".
    dense_fallback: write modules the format cannot hold dense (in `dtype`, listed in `ignore`)
    instead of refusing. symmetric: write asymmetric grids in their exact symmetric form (codes minus
    zero points; the module docstring says when one exists). Returns {dtype, format, config_groups, ignore, dense_fallback, verified_exact,
    safetensors_bytes, notes}. Raises UserError (one line) when compressed-tensors is missing, for a
    bad dtype, for a module the format cannot hold (see the module docstring), or with `symmetric`
    for a module whose codes have no exact symmetric form.
    """
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.utils import replace_direct_state_dict
    except ImportError:
        raise UserError("the compressed-tensors export needs the compressed-tensors package; "
                        "install it with: pip install 'compressed-tensors>=0.19'") from None
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: the compressed-tensors export writes one of {', '.join(DTYPES)}; pass one of them")
    from ..arch import arch_of

    if arch_of(model.config.model_type).experts:
        # transformers (5.x) fuses experts into 3-D parameters that compressed-tensors' quantized
        # modules do not replace, so no reader here could check the file (llm-compressor's own MoE
        # checkpoints load in vLLM only: vllm-project/llm-compressor#2699)
        raise UserError(f"the compressed-tensors export does not write a mixture of experts "
                        f"({model.config.model_type}): transformers loads no quantized experts, so no reader here "
                        "could check the file; export it with --format hf (dense)")
    conv1d = arch_of(model.config.model_type).conv1d
    stored = {n: m for n, m in model.named_modules() if isinstance(m, StoredModule)}
    outer = {n: m for n, m in stored.items() if isinstance(m, CompressedModule)
             and not any(n.startswith(f"{o}.") for o in stored)}  # (a generator goes with densify)
    packable, refused = {}, []
    for name, module in outer.items():
        problem = _problem(name, module, conv1d and name != "lm_head", compressed_tensors.__version__)
        if problem is None and module.kind == "quant":
            packable[name] = module
        elif problem is not None:
            refused.append((name, module.kind, *problem))
    if refused and not dense_fallback:
        name, kind, why, where = refused[0]
        more = f" (and {len(refused) - 1} more modules)" if len(refused) > 1 else ""
        raise UserError(f"{kind} module {name}{more}: {why}; export it with {where}, or pass "
                        "--dense-fallback to write such modules dense (listed in ignore)")

    asymmetric = [n for n, m in packable.items() if not m.symmetric]
    spans = {n: _span(packable[n]) for n in asymmetric}  # (lowest, highest) q - z of each
    if symmetric:
        for name in asymmetric:
            _check_symmetric_form(name, packable[name], spans[name])
    schemes, groups, verified = {}, {}, 0
    actorder = _actorder(manifest)
    for name, module in packable.items():
        key = _grid(module, symmetric)
        scheme = schemes.get(key) or schemes.setdefault(key, _scheme(key, actorder))
        groups.setdefault(key, []).append(name)
        tensors = _pack(module, symmetric)
        verified += _verify(name, module, tensors, scheme)
        linear = _set(model, name, _empty_linear(module))
        replace_direct_state_dict(linear, tensors)
        linear.quantization_scheme = scheme
        linear.quantization_status = QuantizationStatus.COMPRESSED
    densify(model, DTYPES[dtype])  # fallbacks and tied heads dense; every float tensor to dtype
    check_range(model, dtype)
    # one grid: target the class, as llm-compressor does (every other nn.Linear lands in ignore);
    # several: each group targets its exact module names
    for key, scheme in schemes.items():
        scheme.targets = ["Linear"] if len(schemes) == 1 else list(groups[key])
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    config = compressor.quantization_config
    if config is not None:  # ignore: every dense nn.Linear (the library's list) and every fallback
        config.ignore = list(config.ignore or []) + [n for n, *_ in refused if n not in config.ignore]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out_dir, safe_serialization=True)
    compressor.update_config(str(out_dir))
    tokenizer.save_pretrained(out_dir)

    notes = [f"{b}-bit codes stored in {_grid(m, symmetric)[0]}-bit fields: exact, nothing re-quantized"
             for b, m in sorted({m.bits: m for m in packable.values() if m.bits not in (4, 8)}.items())]
    if dtype == "bfloat16" and packable:
        notes.append("bfloat16: our float16 scales are rounded once to bfloat16 (not exact)")
    split = _split_fused(model)
    if split:
        notes.append(f"vLLM fuses q/k/v and gate/up projections and needs one scheme per fused layer; "
                     f"{len(split)} differ (e.g. {split[0]}): transformers loads this file, vLLM refuses it")
    if refused:
        notes.append(f"--dense-fallback: {len(refused)} modules written dense in {dtype} "
                     f"(e.g. {refused[0][0]}, {refused[0][1]}), not compressed in this file")
    if config is None:
        notes.append("no quantized linear: a dense model, written without quantization_config")
    if symmetric and asymmetric:
        notes.append(f"--symmetric: {len(asymmetric)} asymmetric modules written in their symmetric form (codes "
                     "minus zero points, the same weights to the bit): transformers' plain from_pretrained and vLLM "
                     "load this folder as written")
    if any(not key[2] for key in schemes):  # what its readers need (the module docstring's "Loading")
        fits = all(_symmetric_form_problem(packable[n], spans[n]) is None for n in asymmetric)
        notes.append("asymmetric grids: vLLM reads this folder as written; transformers' plain from_pretrained "
                     "refuses asymmetric pack-quantized files (llm-compressor's own too): pass "
                     "quantization_config=CompressedTensorsConfig(dequantize=True)"
                     + (" (checked here with one config group; this file has "
                        f"{len(schemes)})" if len(schemes) > 1 else "") + ", or "
                     + ("export with --symmetric for a folder it loads as written (these codes have an exact "
                        "symmetric form)" if fits else
                        "compress with --set symmetric=true for a folder it loads as written (some 4- or 8-bit "
                        "codes lie too far from their zero points for an exact symmetric form)"))
    return {
        "dtype": dtype, "format": FORMAT, "compressed_tensors": compressed_tensors.__version__,
        "config_groups": {
            group: {"num_bits": key[0], "strategy": "channel" if key[1] is None else "group",
                    "group_size": key[1], "symmetric": key[2], "modules": len(groups[key]),
                    "our_bits": sorted({packable[n].bits for n in groups[key]})}
            for group, scheme in (config.config_groups.items() if config is not None else [])
            for key in schemes if schemes[key] == scheme},
        "ignore": config.ignore if config is not None else [],
        "dense_fallback": [{"module": n, "kind": k, "why": w} for n, k, w, _ in refused],
        "verified_exact": verified,
        "safetensors_bytes": sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors")),
        "notes": notes,
    }


def _problem(name: str, module: StoredModule, is_conv1d: bool, version: str) -> tuple[str, str] | None:
    """(why compressed-tensors cannot hold this module, the format that can), or None if it can."""
    kind = module.kind
    if kind == "tied_head":
        return None  # no tensor of its own: the lm_head is tied to the embedding again
    if kind == "quant":
        if not module.symmetric and module.zero_point == "float":
            return ("its float zero point (w = q*s + m) has no exact form on compressed-tensors' "
                    "integer grid", "--format gguf")
        if is_conv1d:
            return "compressed-tensors quantizes nn.Linear layers, not GPT-2's Conv1D", "--format gguf"
        return None
    if kind == "quant_embedding":
        return "compressed-tensors and vLLM do not quantize embeddings", "--format gguf"
    if kind == "sparse":
        return (f"compressed-tensors {version} has no 2:4/bitmask sparsity compressor that composes "
                "with pack-quantized", "--format hf (dense)")
    return "compressed-tensors holds only integer-grid quantized linears", "--format hf (dense)"


def _split_fused(model: nn.Module) -> list[str]:
    """Projections vLLM fuses into one layer (q/k/v, gate/up) stored with different schemes (or one
    dense): their common parent names."""
    schemes = {n: getattr(m, "quantization_scheme", None) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)}
    split = []
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        for name in [n for n in schemes if n.endswith(f".{fused[0]}")]:
            parent = name.rpartition(".")[0]
            members = [schemes.get(f"{parent}.{leaf}") for leaf in fused if f"{parent}.{leaf}" in schemes]
            if any(m != members[0] for m in members):
                split.append(f"{parent}.{'/'.join(fused)}")
    return split


def _grid(module, symmetric: bool = False) -> tuple[int, int | None, bool]:
    """(B = stored bits, group size or None for one scale per row, symmetric) of a QuantLinear as
    written (`symmetric`: asymmetric grids in their symmetric form)."""
    stored_bits = 4 if module.bits <= 4 else 8
    group = None if module.group_size == module.in_features else module.group_size
    return stored_bits, group, bool(module.symmetric or symmetric)


def _span(module) -> tuple[int, int]:
    """(lowest, highest) q - z over an asymmetric module's weights."""
    codes, zeros = _signed_codes(module)
    centred = _centred(codes, zeros)
    return int(centred.min()), int(centred.max())


def _centred(codes: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q - z (int16, (out, in)) from signed codes (out, in) and zero points (out, groups)."""
    group = codes.shape[1] // zeros.shape[1]
    return codes.to(torch.int16) - zeros.to(torch.int16).repeat_interleave(group, 1)


def _symmetric_form_problem(module, span: tuple[int, int]) -> str | None:
    """Why an asymmetric module has no exact symmetric form in its B-bit field, or None."""
    stored_bits = _grid(module)[0]
    low, high = -(1 << (stored_bits - 1)), (1 << (stored_bits - 1)) - 1
    if low <= span[0] and span[1] <= high:
        return None
    return (f"its {module.bits}-bit codes minus their zero points span {span[0]}..{span[1]}, outside the "
            f"{stored_bits}-bit signed field ({low}..{high})")


def _check_symmetric_form(name: str, module, span: tuple[int, int]) -> None:
    problem = _symmetric_form_problem(module, span)
    if problem is not None:
        raise UserError(f"--symmetric: module {name}: {problem}, so it has no exact symmetric form; compress with "
                        "--set symmetric=true, or export without --symmetric (vLLM reads the asymmetric folder)")


def _actorder(manifest: dict[str, Any]) -> str | None:
    """compressed-tensors' `actorder` metadata: "static" when every stage of the artifact's recipe is
    GPTQ with act_order (ours keeps static groups in column order: no g_idx), else None (none used)."""
    stages = manifest.get("recipe") or []
    gptq = stages and all(s.get("method") == "gptq" and s.get("act_order") for s in stages)
    return "static" if gptq else None


def _scheme(key: tuple[int, int | None, bool], actorder: str | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, group, symmetric = key
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, actorder=actorder,
                            strategy="channel" if group is None else "group", group_size=group)
    return QuantizationScheme(targets=["Linear"], weights=args, format=FORMAT)


def _signed_codes(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our codes and zero points shifted to compressed-tensors' signed convention: q' = q - 2^(b-1)
    as int8 (out, in), z' = z - 2^(b-1) as int8 (out, groups), or None when symmetric."""
    out, cols, bits = module.out_features, module.in_features, module.bits
    offset = 1 << (bits - 1)
    codes = unpack_codes(module.qweight, bits, out * cols).view(out, cols).to(torch.int16) - offset
    zeros = None
    if not module.symmetric:
        groups = module.scales.shape[1]
        zeros = unpack_codes(module.qzeros, bits, out * groups).view(out, groups).to(torch.int16) - offset
        zeros = zeros.to(torch.int8)
    return codes.to(torch.int8), zeros


def _pack(module, symmetric: bool = False) -> dict[str, torch.Tensor]:
    """The module's tensors in pack-quantized layout (names as compressed-tensors' compressor uses);
    `symmetric`: an asymmetric grid as q - z without zero points (checked to fit beforehand)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    stored_bits = _grid(module)[0]
    codes, zeros = _signed_codes(module)
    if symmetric and zeros is not None:
        codes, zeros = _centred(codes, zeros).to(torch.int8), None
    tensors = {"weight_packed": pack_to_int32(codes, stored_bits),
               "weight_scale": module.scales.detach().clone(),
               "weight_shape": torch.tensor([module.out_features, module.in_features])}
    if zeros is not None:
        tensors["weight_zero_point"] = pack_to_int32(zeros, stored_bits, packed_dim=0)
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().clone()
    return tensors


def _verify(name: str, module, tensors: dict[str, torch.Tensor], scheme) -> int:
    """Decompress `tensors` with compressed-tensors' own compressor and check, bit for bit in float32,
    that it gives our dequantized weight; and that the names are the compressor's. Returns 1."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    expected = set(PackedQuantizationCompressor.compression_param_names(scheme))
    if expected != set(tensors) - {"bias"}:
        raise RuntimeError(f"{name}: tensors {sorted(tensors)} differ from compressed-tensors' "
                           f"{sorted(expected)}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items() if k != "bias"}
    weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    if not torch.equal(weight, module.dense_weight(torch.float32)):
        raise RuntimeError(f"{name}: compressed-tensors decompresses a different weight than the artifact's")
    return 1


def _empty_linear(module) -> nn.Linear:
    """An nn.Linear of the module's shape with no weight data (replaced by the packed tensors)."""
    return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")


def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
    return module
