"""The strict artifact reader: every file, manifest field, layout and tensor header of an artifact is
checked against the others and against the model's config before any tensor is read.

An artifact may be corrupt or hostile (docs/FORMAT.md, "Reading an artifact"). `verify(path)`:
1. the manifest is a regular file of at most MAX_DOCUMENT_BYTES, parsed as JSON and validated by a
   schema (pydantic, strict types, no unknown keys where the format fixes them);
2. every listed file is a plain name in the directory, a regular file (a link may point to one, as in
   a Hugging Face cache snapshot; a FIFO or device is refused before it is opened), of a bounded size
   (the weights file exactly the size the manifest states); every file transformers would read
   (config, tokenizer) is listed, so none escapes the hashes; the small files are hashed;
3. the config builds a model skeleton on the meta device (no memory), within MAX_LAYERS layers;
4. every module's layout is validated against its kind's constructor signature and ranges, then the
   module is built on the meta device and must fit the layer it replaces (in/out features, vocab/dim);
5. the tensors those modules and the config imply (names, dtypes, shapes, so byte counts) and the
   tied names (aliases) must equal the safetensors header (read by safetensors, not by us) exactly;
6. only then is the weights file hashed. `artifact.load` reads the tensors afterwards and checks
   values (finite floats, each kind's `check_stored`), then runs one forward on two tokens.
What this cannot catch: an edit that keeps the artifact structurally valid with resealed hashes (a
changed scale, a swapped code): the file says what it says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import UserError, user_path
from ..layers.build import MAX_LAYOUT_INT, build_stored

FORMAT_VERSION = 1
MANIFEST = "hypercompress.json"
WEIGHTS = "model.safetensors"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"  # written by compress (summary.py), hashed as listed files
MAX_DOCUMENT_BYTES = 64 << 20  # manifest, config, tokenizer, summary: far above any real one
MAX_LAYERS = 1024  # decoder layers a config may declare (the largest public models have ~130)
SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$"
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,15}$"
# files in a model directory that transformers reads when loading the config or tokenizer
TRANSFORMERS_READS = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json"
                                r"|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken"
                                r"|chat_template\..*)$")
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                      torch.float64: "F64", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                      torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
DENSE_WIDER = {"float32": torch.float32}  # dense tensors stored wider than float16 (values beyond its range)


def _fail(path: Path, problem: str) -> UserError:
    return UserError(f"artifact {path}: {problem}; re-create the artifact")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ModuleEntry(_Strict):
    kind: str
    layout: dict[str, Any]


class Totals(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    tensor_bits: int = Field(ge=0)
    safetensors_bytes: int = Field(gt=8)
    bits_per_weight: float = Field(ge=0, strict=False)


class CodedTensor(_Strict):
    dtype: str
    shape: list[Annotated[int, Field(ge=0, lt=MAX_LAYOUT_INT)]] = Field(max_length=8)
    planes: list[Annotated[tuple[Literal["zstd", "raw"], Annotated[int, Field(ge=0)]], Field(strict=False)]] = \
        Field(max_length=8)  # JSON has no tuples: a [codec, bytes] list


class LosslessReport(_Strict):
    tensors: int = Field(ge=0)
    raw_bytes: int = Field(ge=0)
    coded_bytes: int = Field(ge=0)
    ratio: float = Field(ge=0, strict=False)


class Lossless(_Strict):
    codec: str
    level: int = Field(ge=1, le=22)
    tensors: dict[str, CodedTensor]
    report: dict[str, LosslessReport]


class Manifest(_Strict):
    """hypercompress.json (docs/FORMAT.md); `extra` keys a compress run adds (source_model, seed,
    summary fields) are allowed and not interpreted."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["hypercompress"]
    format_version: Literal[1]
    architecture: str
    storage_dtype: Literal["float16"]
    original_params: int = Field(gt=0)
    recipe: list[dict[str, Any]]
    modules: dict[Annotated[str, Field(pattern=MODULE_NAME)], ModuleEntry]
    aliases: dict[Annotated[str, Field(pattern=MODULE_NAME)], Annotated[str, Field(pattern=MODULE_NAME)]]
    files: dict[Annotated[str, Field(pattern=SAFE_NAME)], Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]
    totals: Totals
    lossless: Lossless | None = None
    dense_dtypes: dict[str, Literal["float32"]] = {}


@dataclass
class Verified:
    """What `verify` established: the manifest (validated dict), the source config, the skeleton
    (dense parameters and compressed modules on the meta device), and the expected tensors."""

    path: Path
    manifest: dict[str, Any]
    config: Any
    model: nn.Module
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # stored name -> (dtype, shape)
    header: dict[str, tuple[str, list[int]]]  # stored name -> (safetensors dtype, shape) as in the file


def verify(path: str | Path) -> Verified:
    """Every structural check of the module docstring; raises UserError naming the first problem."""
    path = user_path(path)
    if not path.is_dir():
        raise UserError(f"artifact not found: {path}; pass a directory written by 'hypercompress compress'")
    manifest = read_manifest_fields(path)
    _check_inventory(path, manifest)
    for name, digest in manifest["files"].items():
        if name != WEIGHTS:
            _check_hash(path, name, digest)
    _refuse_custom_code(path)
    config = read_config(path)
    if config.model_type != manifest["architecture"]:
        raise _fail(path, f"the manifest says {manifest['architecture']!r} but config.json says "
                          f"{config.model_type!r}")
    model = skeleton(path, config, manifest["modules"])
    expected, aliases = expected_tensors(path, model, manifest)
    if aliases != manifest["aliases"]:
        raise _fail(path, f"its tied tensors {manifest['aliases']} are not the model's {aliases}")
    header = _read_header(path)
    _check_header(path, header, expected, manifest.get("lossless"))
    _check_totals(path, manifest, expected)
    _check_hash(path, WEIGHTS, manifest["files"][WEIGHTS])
    return Verified(path, manifest, config, model, expected, header)


def _check_totals(path: Path, manifest: dict[str, Any], expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]
                  ) -> None:
    """`totals` restate what the tensors and the file size imply; a total that does not is an edit."""
    totals = manifest["totals"]
    bits = sum(torch.empty(0, dtype=dtype).element_size() * 8 * _numel(shape) for dtype, shape in expected.values())
    if totals["tensor_bits"] != bits:
        raise _fail(path, f"totals.tensor_bits is {totals['tensor_bits']:,}, its tensors hold {bits:,} bits")
    bpw = totals["safetensors_bytes"] * 8 / manifest["original_params"]
    if not math.isclose(totals["bits_per_weight"], bpw, rel_tol=1e-9):
        raise _fail(path, f"totals.bits_per_weight is {totals['bits_per_weight']}, its file and "
                          f"original_params give {bpw}")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def read_manifest_fields(path: Path) -> dict[str, Any]:
    """The manifest, parsed and validated by the schema (no file other than it is read)."""
    file = path / MANIFEST
    if not file.exists():
        raise UserError(f"{path} has no {MANIFEST}: not a hypercompress artifact; pass a directory written by "
                        "'hypercompress compress'")
    try:
        manifest = json.loads(read_document(file))
    except (ValueError, RecursionError):
        raise UserError(f"{file} is corrupt (not JSON); re-create the artifact") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{file} is corrupt (not a JSON object); re-create the artifact")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # 1.0 and true equal 1 in Python
        raise UserError(f"artifact format version {version!r} is not supported (this hypercompress reads "
                        f"{FORMAT_VERSION}); re-create the artifact or upgrade hypercompress")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "top level"
        raise UserError(f"{file} is invalid at '{where}': {error['msg']}; re-create the artifact") from None
    if WEIGHTS not in manifest["files"]:
        raise UserError(f"{file} lists no {WEIGHTS}; re-create the artifact")
    return manifest


def read_document(file: Path, limit: int = MAX_DOCUMENT_BYTES, fix: str = "re-create the artifact") -> str:
    """A small text file (UTF-8: an artifact's JSON, a recipe, a results file), refused with a
    UserError ending in `fix` if it is not a regular file or is larger than `limit` bytes (checked
    before it is opened or read: a FIFO or a link to a huge file never is)."""
    info = _regular_file(file, fix)
    if info.st_size > limit:
        raise UserError(f"{file} is {info.st_size:,} bytes, more than the {limit:,} a {file.name} can "
                        f"need; {fix}")
    try:
        with open(file, "rb") as handle:
            data = handle.read(limit + 1)  # bounded even if the file grew since it was checked
    except OSError as exc:
        raise UserError(f"{file} is not readable text ({type(exc).__name__}); {fix}") from None
    if len(data) > limit:
        raise UserError(f"{file} is more than the {limit:,} bytes a {file.name} can need; {fix}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file} is not readable text ({type(exc).__name__}); {fix}") from None


def _regular_file(file: Path, fix: str = "re-create the artifact") -> os.stat_result:
    what = "artifact file" if fix == "re-create the artifact" else "file"
    try:
        info = os.stat(file)  # follows a link (a hub snapshot links to its blobs)
    except OSError:
        raise UserError(f"{what} {file} is missing or unreadable; {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} {file} is not a regular file; {fix}")
    return info


def _check_inventory(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    if MANIFEST in files:
        raise _fail(path, "the manifest lists itself under 'files'")
    for name in files:
        size = _regular_file(path / name).st_size
        if name == WEIGHTS and size != manifest["totals"]["safetensors_bytes"]:
            raise _fail(path, f"{WEIGHTS} is {size:,} bytes, the manifest says "
                              f"{manifest['totals']['safetensors_bytes']:,}")
        if name != WEIGHTS and size > MAX_DOCUMENT_BYTES:
            raise _fail(path, f"{name} is {size:,} bytes, more than any artifact file but the weights")
    unlisted = sorted(p.name for p in path.iterdir() if TRANSFORMERS_READS.match(p.name) and p.name not in files)
    if unlisted:
        raise UserError(f"artifact {path}: {unlisted[0]} is not listed in {MANIFEST} (transformers would read "
                        "it unchecked); remove it or re-create the artifact")


def _refuse_custom_code(path: Path) -> None:
    """An artifact never asks transformers to import code: `auto_map` in its config or tokenizer
    config is refused (transformers would otherwise ask whether to run it, or run it if told to)."""
    for name in ("config.json", "tokenizer_config.json"):
        if not (path / name).exists():
            continue
        try:
            data = json.loads(read_document(path / name))
        except (ValueError, RecursionError):
            raise UserError(f"{path / name} is not JSON; re-create the artifact") from None
        if isinstance(data, dict) and ("auto_map" in data or "auto_map" in (data.get("base_config") or {})):
            raise UserError(f"{path / name} asks to run custom code (auto_map), which hypercompress never "
                            "does; re-create the artifact from a model that needs no custom code")


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (artifacts and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: Path, name: str, digest: str) -> None:
    if file_sha256(path / name) != digest:
        raise UserError(f"artifact file {path / name} fails its sha256 check (corrupt or tampered); "
                        "re-create the artifact")


def read_config(path: Path):
    """The source model's config of an artifact: config.json's base_config (the wrapper that
    storage/hf_integration.py describes), or config.json itself for artifacts written before it."""
    from transformers import AutoConfig

    from .hf_config import MODEL_TYPE, base_config_of

    try:
        raw = json.loads(read_document(path / "config.json"))
    except (ValueError, RecursionError):
        raise UserError(f"{path / 'config.json'} is not JSON; re-create the artifact") from None
    if isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE:
        config = base_config_of(raw.get("base_config"))
    else:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except Exception as exc:  # a hostile config.json: any parse error is a refusal
            raise UserError(f"{path / 'config.json'} is not a readable config ({type(exc).__name__}); "
                            "re-create the artifact") from None
    from ..arch import POSITION_KEYS

    for key in POSITION_KEYS:  # a length limit the checks read must be a positive count
        value = getattr(config, key, None)
        if value is not None and (type(value) is not int or value < 1):
            raise UserError(f"{path / 'config.json'} declares {key} = {value!r}; re-create the artifact")
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= MAX_LAYERS:
        raise UserError(f"{path / 'config.json'} declares {layers!r} layers (1..{MAX_LAYERS} are read); "
                        "re-create the artifact")
    return config


def skeleton(path: Path, config: Any, modules: dict[str, dict[str, Any]]) -> nn.Module:
    """The model of `config` with every recorded module in place, all on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..arch import arch_of, submodule_or_none
    from ..experts import unfuse_experts
    from ..modules import replace_module

    arch_of(config.model_type)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # init_empty_weights skips it; the stored aliases must match the ties
        unfuse_experts(model)  # a mixture of experts is stored one linear per expert matrix
    except Exception as exc:  # a hostile config: any failure to build it is a refusal
        raise _fail(path, f"its config does not build a {config.model_type} model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    from ..layers.base import StoredModule

    for name in sorted(modules, key=lambda n: (n.count("."), n)):  # outer modules before their bases
        entry = modules[name]
        module = build_stored(entry, f"module {name}", path)
        present = submodule_or_none(model, name)
        if isinstance(present, StoredModule):  # a base its wrapper's layout already built
            if present.kind != module.kind or present.layout() != module.layout():
                raise _fail(path, f"module {name} differs from the base its wrapper records")
            continue
        problem = module.misfit(present)
        if problem:
            raise _fail(path, f"module {name} ({entry['kind']}) does not fit the model: {problem}")
        parent = name.rpartition(".")[0]
        if parent and submodule_or_none(model, parent) is None:
            raise _fail(path, f"module {name}: the model has no {parent}")
        replace_module(model, name, module)
    stored = {n for n, m in model.named_modules() if isinstance(m, StoredModule)}
    unlisted = sorted(stored - set(modules))
    if unlisted:  # e.g. the tied head that replacing the embedding makes, or a wrapper's base
        raise _fail(path, f"module {unlisted[0]} is implied by the others but not listed in the manifest")
    return model


def expected_tensors(path: Path, model: nn.Module, manifest: dict[str, Any]
                     ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """(stored name -> (dtype, shape), aliases) that `artifact.save` writes for `model`: compressed
    modules' tensors as they are, other floating tensors float16 (or as `dense_dtypes` records)."""
    prefixes = tuple(f"{n}." for n in manifest["modules"])
    wider = manifest.get("dense_dtypes", {})
    expected, aliases, first = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        dtype = tensor.dtype
        if tensor.is_floating_point() and not name.startswith(prefixes):
            dtype = DENSE_WIDER[wider[name]] if name in wider else torch.float16
        expected[name] = (dtype, tuple(tensor.shape))
    stray = sorted(set(wider) - set(expected))
    if stray:
        raise _fail(path, f"dense_dtypes names {stray[0]}, which the model does not store")
    return expected, aliases


def _read_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from the safetensors header (safetensors bounds and validates it)."""
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as handle:
            return {key: (handle.get_slice(key).get_dtype(), list(handle.get_slice(key).get_shape()))
                    for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"{WEIGHTS} is not a valid safetensors file ({first})") from None


def _check_header(path: Path, header: dict[str, tuple[str, list[int]]],
                  expected: dict[str, tuple[torch.dtype, tuple[int, ...]]], coding: dict | None) -> None:
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        what = f"it lacks tensor {missing[0]}" if missing else f"it holds an unexpected tensor {extra[0]}"
        raise _fail(path, f"{WEIGHTS} does not match its manifest ({what})")
    if coding is not None:
        from ..formats import lossless

        if coding["codec"] != lossless.CODEC:
            raise UserError(f"artifact {path} is coded with {coding['codec']!r}, which this hypercompress does "
                            "not read; upgrade hypercompress or re-create the artifact")
        if set(coding["tensors"]) != set(expected):
            raise _fail(path, "its coded tensors do not match the manifest")
    for name, (dtype, shape) in expected.items():
        stored_dtype, stored_shape = header[name]
        if coding is not None:
            entry = coding["tensors"][name]
            problem = lossless.entry_problem(entry, dtype, shape, stored_dtype, stored_shape)
            if problem:
                raise _fail(path, f"coded tensor {name}: {problem}")
        elif stored_dtype != SAFETENSORS_DTYPES.get(dtype) or tuple(stored_shape) != shape:
            raise _fail(path, f"tensor {name} is {stored_dtype} {tuple(stored_shape)}, the model needs "
                              f"{SAFETENSORS_DTYPES.get(dtype)} {shape}")
