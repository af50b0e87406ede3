"""`--format hf`: dense safetensors + config + tokenizer that any tool loads.

The weights are those the artifact computes with (every compressed module's `dense_weight`), in
bfloat16 unless `dtype` says otherwise; the file is as large as the original model's. Structured
pruning's smaller shapes are kept (the config already says them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .dense import check_range, densify

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def write(model, tokenizer, manifest: dict[str, Any], out_dir: Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """Save `model` densified to `out_dir` with `save_pretrained`; returns {dtype, bytes}."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: the hf export writes one of {', '.join(DTYPES)}; pass one of them")
    densify(model, DTYPES[dtype])
    check_range(model, dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    size = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    return {"dtype": dtype, "safetensors_bytes": size,
            "note": "dense weights: every compressed module expanded, as large as the original"}

