"""`transformers.AutoModelForCausalLM.from_pretrained(artifact_dir)` loads a hypercompress artifact.

An artifact's config.json is a wrapper: model_type "hypercompress", the source model's own config
under `base_config`, and a `quantization_config` {quant_method: "hypercompress"} for tools that
look there. Why a wrapper and not only a quantization_config (as HQQ and torchao do): those live
inside transformers, whereas transformers 5 merely warns about a quant_method it does not know and
then loads the base architecture with every compressed linear randomly initialised, a silently wrong
model. With model_type "hypercompress", transformers without this package refuses the directory
("model type `hypercompress` ... does not recognize this architecture"); importing hypercompress
registers the config and model classes below with transformers' Auto classes, and from_pretrained
returns `hypercompress.load(dir, dtype, device)`: the compressed modules on that device's kernels.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from .hf_config import MODEL_TYPE, HypercompressConfig

class HypercompressForCausalLM(PreTrainedModel):
    """Only a door: from_pretrained returns the artifact's own model class (e.g. LlamaForCausalLM)
    with its compressed modules, as `hypercompress.load` builds it."""

    config_class = HypercompressConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, dtype: Any = None,
                        torch_dtype: Any = None, device_map: Any = None, **kwargs: Any):
        """dtype: torch dtype or its name ("auto"/None: float32 on the CPU, bfloat16 on CUDA);
        device_map: None, a device string ("cuda", "cuda:0", "cpu") or {"": device}."""
        from .artifact import load

        device = device_map.get("", "cpu") if isinstance(device_map, dict) else (device_map or "cpu")
        device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        device = "cpu" if device == "auto" else device
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if dtype in (None, "auto"):
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        model, _ = load(pretrained_model_name_or_path, dtype=dtype, device=device)
        return model


def register() -> None:
    """Make transformers' Auto classes know artifacts (idempotent), and bound the config files they
    read (_bounded_config_reader)."""
    AutoConfig.register(MODEL_TYPE, HypercompressConfig, exist_ok=True)
    AutoModelForCausalLM.register(HypercompressConfig, HypercompressForCausalLM, exist_ok=True)
    _bounded_config_reader()


def _bounded_config_reader() -> None:
    """transformers reads config.json (and generation_config.json) whole before it knows whose it is:
    one linked to an 8 GiB file exhausts memory before our class is reached. Once hypercompress is
    imported, such a file over MAX_DOCUMENT_BYTES (64 MiB; real ones are kilobytes) is refused in one
    line naming it (UserError) before a byte is read; others are read exactly as transformers does."""
    from transformers import GenerationConfig

    for owner in (PreTrainedConfig, GenerationConfig):
        original = getattr(owner.__dict__.get("_dict_from_json_file"), "__func__", None)
        if original is not None and not getattr(original, "bounded", False):  # another layout, or done
            owner._dict_from_json_file = classmethod(_bounded(original))


def _bounded(original):
    def bounded(cls, json_file):
        from .reader import MAX_DOCUMENT_BYTES
        from ..errors import UserError

        try:
            size = os.stat(json_file).st_size
        except OSError:
            size = 0  # transformers names the missing file itself
        if size > MAX_DOCUMENT_BYTES:
            raise UserError(f"{json_file} is {size:,} bytes, over the {MAX_DOCUMENT_BYTES:,} a config file may "
                            "hold; check the file (a link to something else?) or re-create the model folder")
        return original(cls, json_file)

    bounded.bounded = True
    return bounded


register()  # importing this module (hypercompress does when transformers loads its Auto classes) registers
