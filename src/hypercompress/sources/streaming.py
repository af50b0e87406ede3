"""Models larger than RAM: the original's blocks read from its safetensors files one at a time.

`load_streamed(directory)` builds the model on the meta device (accelerate's `init_empty_weights`:
no weight allocated), reads every tensor outside the transformer blocks (embeddings, final norm,
lm_head) and attaches a `LazyWeights` that reads the rest on demand. The layer-wise runner
(layerwise.run_layerwise) calls `materialize(model, "model.layers.i.")` before block i, and the
block's linears are replaced by their compressed modules right after, so the original's dense
blocks never sit in RAM together: peak host memory is about the dense parts outside the blocks,
one dense block, the calibration activations and the compressed blocks done so far. This is the
"sequential onloading" of llm-compressor and GPTQModel's layer-by-layer loading.

Stages that need the whole original at once (a size target's planner, distillation's teacher,
per-branch evaluation) call `materialize_all` first, or are refused with the reason.
Every file is validated before use: the index's file names stay inside the directory, each
file's header names only tensors of the model's shapes, every tensor of the model is present, and
a tensor holding inf or nan is refused when it is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..arch import arch_of
from ..errors import UserError, user_path
from ..layers.base import LINEAR_TYPES, CompressedModule
from ..modules import tied_parameter_names

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_INDEX_BYTES = 64 * 2**20  # an index of a 70B model is ~100 kB; a larger one is not read


class LazyWeights:
    """Where each tensor of a meta-device model lives: {name: safetensors file}, read on demand.

    dtype: the floating dtype tensors are converted to when read (the model's compute dtype)."""

    def __init__(self, directory: Path, files: dict[str, Path], dtype: torch.dtype):
        self.directory, self.files, self.dtype = directory, files, dtype
        self.reads = 0  # tensors read so far (the tests count what one block reads)

    def load(self, model: nn.Module, names: list[str]) -> None:
        """Read `names` (parameters / buffers of `model` still on the meta device) into place on the CPU."""
        from accelerate.utils import set_module_tensor_to_device

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name in self.files:  # (a tied head is read through the tensor it shares)
                by_file.setdefault(self.files[name], []).append(name)
        for file, group in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in group:
                        tensor = handle.get_tensor(name)
                        if tensor.is_floating_point():
                            if not bool(torch.isfinite(tensor).all()):
                                raise UserError(f"the model's tensor {name} holds inf or nan ({file.name}); "
                                                "compress a model whose weights are finite (check or "
                                                "re-download its files)")
                            tensor = tensor.to(self.dtype)
                        set_module_tensor_to_device(model, name, "cpu", value=tensor)
                        self.reads += 1
            except UserError:
                raise
            except Exception as exc:  # a file changed or truncated since its header was checked
                raise UserError(f"cannot read {file} ({type(exc).__name__}); check or re-download the "
                                "model files") from None


def lazy_of(model: nn.Module) -> LazyWeights | None:
    return getattr(model, "hypercompress_lazy", None)


def materialize(model: nn.Module, prefix: str) -> None:
    """Read every tensor under `prefix` (e.g. "model.layers.3." or a linear's "NAME.") that is still
    on the meta device; nothing to do for a model loaded whole."""
    lazy = lazy_of(model)
    if lazy is None:
        return
    names = [n for n, t in _tensors(model) if t.device.type == "meta" and n.startswith(prefix)]
    lazy.load(model, names)


def materialize_all(model: nn.Module) -> None:
    """Read every tensor still on the meta device (the whole original is then in RAM)."""
    materialize(model, "")


def is_streamed(model: nn.Module) -> bool:
    """Whether some of the original's tensors are still on disk, not in memory."""
    return lazy_of(model) is not None and any(t.device.type == "meta" for _, t in _tensors(model))


def _tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def load_streamed(source: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model with its blocks on the meta device and a LazyWeights attached, tokenizer) from a local
    Hugging Face directory whose weights are safetensors (one file or an index of shards).

    Raises UserError for a source that is not such a directory, an unsupported architecture, an
    index or header that names files outside the directory, tensors of wrong shapes, or a missing
    tensor (transformers would fill it at random)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = user_path(source)
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise UserError(f"--stream-blocks reads a local Hugging Face model directory (config.json + "
                        f"safetensors); {source} is not one: drop --stream-blocks or pass such a directory")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:
        raise UserError(f"could not read {directory / 'config.json'}: {_first_line(exc)}; check the model files") from None
    spec = arch_of(config.model_type)
    if spec.experts:
        raise UserError(f"--stream-blocks does not read a mixture of experts ({config.model_type}) yet; "
                        "load it without --stream-blocks")
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary tables computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # a tied head shares the embedding's parameter before anything is read
    model.eval().requires_grad_(False)
    shapes = {n: tuple(t.shape) for n, t in _tensors(model)}
    files = _tensor_files(directory)
    _check_headers(directory, files, shapes, model)
    if getattr(config, "quantization_config", None) is None:
        check_float_weights(sorted(set(files.values())))
    lazy = LazyWeights(directory, files, dtype)
    model.hypercompress_lazy = lazy
    outside = [n for n, t in _tensors(model) if t.device.type == "meta" and not n.startswith(f"{spec.blocks}.")]
    lazy.load(model, outside)
    model.tie_weights()  # (once: a later stage may replace the embedding by a compressed module)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:
        raise UserError(f"could not load the tokenizer of {directory}: {_first_line(exc)}; check the model files") from None
    return model, tokenizer


def _tensor_files(directory: Path) -> dict[str, Path]:
    """{tensor name: its safetensors file} from the index (sharded) or the one file's header."""
    index = directory / INDEX
    if index.is_file():
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise UserError(f"{index} is {index.stat().st_size:,} bytes, too large for an index; check the model files")
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, UnicodeDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise UserError(f"{index} has no valid weight_map (tensor name -> file); check or re-download it")
        bad = next((f for f in weight_map.values() if "/" in f or "\\" in f or f.startswith(".")
                    or not f.endswith(".safetensors")), None)
        if bad is not None:
            raise UserError(f"{index} points at '{bad}', not a .safetensors file in {directory}; check the index")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE
    if not single.is_file():
        raise UserError(f"{directory} holds neither {SINGLE} nor {INDEX}; --stream-blocks reads safetensors "
                        "weights only (convert pickle checkpoints first)")
    return {name: single for name in _header_names(single)}


def _header_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise UserError(f"{file} is not a readable safetensors file ({type(exc).__name__}); "
                        "check or re-download it") from None


def _check_headers(directory: Path, files: dict[str, Path], shapes: dict[str, tuple], model: nn.Module) -> None:
    """Every tensor the model needs is in a file that holds it, in the model's shape (headers only)."""
    tied = tied_parameter_names(model)
    missing = sorted(n for n in shapes if n not in files and n not in tied and not _computed_buffer(model, n))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"could not load model '{directory}': the checkpoint lacks tensor {missing[0]}{more}; "
                        "pass a complete checkpoint (transformers would fill it with random values)")
    wanted: dict[Path, list[str]] = {}
    for name, file in files.items():
        if name in shapes:
            wanted.setdefault(file, []).append(name)
    for file, names in wanted.items():
        if not file.is_file():
            raise UserError(f"{file.name}, named by {INDEX}, is missing from {directory}; re-download the model files")
        try:
            with safe_open(str(file), framework="pt") as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise UserError(f"{file.name} does not hold {name}, which {INDEX} places there; "
                                        "re-download the model files")
                    shape = tuple(handle.get_slice(name).get_shape())
                    if shape != shapes[name]:
                        raise UserError(wrong_shape_message(str(directory), name, shape, shapes[name]))
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{file} is not a readable safetensors file ({type(exc).__name__}); "
                            "check or re-download it") from None
    for name in tied:
        files.pop(name, None)  # read once, through the tensor it is tied to


def wrong_shape_message(spec: str, name: str, file_shape: Any, config_shape: Any, more: str = "") -> str:
    """The one-line refusal of a checkpoint tensor whose shape is not the config's (both loaders)."""
    return (f"could not load model '{spec}': the checkpoint holds a wrongly shaped tensor {name} "
            f"({_shape(file_shape)} in the file, {_shape(config_shape)} in the config){more}; pass a complete "
            "checkpoint whose config.json matches its weights")


def _shape(shape: Any) -> str:
    return "x".join(str(int(d)) for d in shape) if isinstance(shape, (tuple, list, torch.Size)) else str(shape)


def check_config_against_headers(spec: str, config: Any, files: list[Path]) -> None:
    """Before a whole-model load allocates anything: UserError when config.json describes a model the
    safetensors `files` cannot be: more blocks than the files hold, a tensor of the same name in
    another shape, or over 1.5x the parameters the files hold (a config claiming a huge model would
    have transformers allocate all of it first). Headers only; the model is built on the meta device
    (no tensor memory) once its block count is known to be the files'. Names the files hold under
    other names (transformers' renames) are left to the load's own report."""
    import re

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    headers: dict[str, tuple] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                headers.update((name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys())
        except Exception as exc:
            raise UserError(f"{file} is not a readable safetensors file ({type(exc).__name__}); "
                            "check or re-download it") from None
    if not headers:
        return
    spec_arch = arch_of(config.model_type)
    leaf = re.escape(spec_arch.blocks.split(".")[-1])
    indices = {int(m.group(1)) for name in headers if (m := re.search(rf"(?:^|\.){leaf}\.(\d+)\.", name))}
    claimed = getattr(config, spec_arch.layers_key, None)
    if indices and isinstance(claimed, int) and claimed > max(indices) + 1:
        raise UserError(f"could not load model '{spec}': config.json describes {claimed:,} blocks but the weight "
                        f"files hold {max(indices) + 1:,}; pass the checkpoint's own config.json")
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    wanted = sum(p.numel() for p in model.parameters())
    held = sum(int(torch.Size(shape).numel()) for shape in headers.values())
    if wanted > 1.5 * held + (1 << 20):
        raise UserError(f"could not load model '{spec}': config.json describes {wanted:,} parameters but the "
                        f"weight files hold {held:,} values; pass the checkpoint's own config.json")
    wrong = next((n for n in headers if n in shapes and headers[n] != shapes[n]), None)
    if wrong is not None:
        raise UserError(wrong_shape_message(spec, wrong, headers[wrong], shapes[wrong]))


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' float dtype names


def check_float_weights(files: list[Path]) -> None:
    """UserError naming the first `.weight` / `.bias` tensor whose safetensors header gives a non-float
    dtype (I32 for a float parameter of the same size: transformers would cast the integers in and
    compress values of ~1e9 without a word). Headers only; for checkpoints without a quantization
    config, whose weights are all floats."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    dtype = handle.get_slice(name).get_dtype()
                    if name.endswith((".weight", ".bias")) and dtype not in FLOAT_DTYPES:
                        raise UserError(f"{file.name} stores {name} as {dtype}, not a float type, for a float "
                                        "parameter: the file is corrupt or mislabelled; re-download the model files")
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{file} is not a readable safetensors file ({type(exc).__name__}); "
                            "check or re-download it") from None


def _computed_buffer(model: nn.Module, name: str) -> bool:
    """A buffer the model computes itself (rotary inv_freq): not on the meta device, not in files."""
    return any(n == name and t.device.type != "meta" for n, t in model.named_buffers(remove_duplicate=False))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def uncompressed(model: nn.Module, name: str, stage: int) -> nn.Module:
    """The linear layer `name`, refusing one an earlier stage already compressed (a streamed
    model's block holding it, or the layer itself outside the blocks, is read from its files
    first: streaming.materialize)."""
    blocks = f"{arch_of(model.config.model_type).blocks}."
    materialize(model, f"{blocks}{name[len(blocks):].split('.')[0]}." if name.startswith(blocks) else f"{name}.")
    layer = model.get_submodule(name)
    if isinstance(layer, CompressedModule) or not isinstance(layer, (*LINEAR_TYPES, nn.Embedding)):
        raise UserError(f"stage {stage}: '{name}' is already compressed (by an earlier stage, or in the model "
                        "compressed before: an artifact); narrow this stage's targets or add it to ignore")
    return layer
