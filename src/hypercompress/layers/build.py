"""Stored modules built from a manifest entry {kind, layout}, the layout checked first against its
kind's constructor (a strict schema) and its ranges; the artifact reader, the checkpoint and the
kinds that wrap a base (LoRA, a residual generator) all build through `build_stored`.

`KINDS` (kind -> class) is filled by the layers package once every kind is imported; this module
imports none of them (a wrapped base is any kind).
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ..errors import UserError

MAX_LAYOUT_INT = 1 << 31  # any integer in a layout
KINDS: dict[str, type] = {}


def build_stored(entry: dict[str, Any], what: str, path: Path | None = None, nested: bool = False,
                 device: str = "meta"):
    """The StoredModule a manifest entry {kind, layout} describes, built after its layout passed its
    kind's schema (the constructor's signature, strict types) and ranges: on `device` (meta: no
    memory; "cpu" once the header proved the file holds its tensors), or for a `nested` base (a
    LoRA's or residual generator's) on the caller's device."""
    where = f"artifact {path}: " if path else ""
    if not isinstance(entry, dict) or set(entry) != {"kind", "layout"} or not isinstance(entry["layout"], dict):
        raise UserError(f"{where}{what} is not a {{kind, layout}} entry; re-create the artifact")
    cls = KINDS.get(entry["kind"])
    if cls is None:
        raise UserError(f"{where}{what} has unknown kind {entry['kind']!r}; upgrade hypercompress or "
                        "re-create the artifact")
    if nested and getattr(cls, "wraps_base", False):
        raise UserError(f"{where}{what}: a {cls.kind} cannot be the base of another module; re-create the artifact")
    layout = entry["layout"]
    try:
        _layout_schema(cls).model_validate(layout)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise UserError(f"{where}{what} ({cls.kind}) layout '{key}': {error['msg']}; re-create the artifact") from None
    problem = _int_range_problem(layout) or cls.layout_problem(layout)
    if problem:
        raise UserError(f"{where}{what} ({cls.kind}) layout: {problem}; re-create the artifact")
    try:
        if nested:
            return cls.from_layout(layout)
        with torch.device(device):
            return cls.from_layout(layout)
    except UserError:
        raise
    except Exception as exc:  # a layout the checks above let through but the constructor refuses
        raise UserError(f"{where}{what} ({cls.kind}) layout does not build ({type(exc).__name__}); "
                        "re-create the artifact") from None


@functools.cache
def _layout_schema(cls: type) -> type[BaseModel]:
    """A strict pydantic model of `cls.__init__`'s parameters (types from its annotations), every one
    required: `layout()` writes them all, so a missing one is an edit."""
    hints = typing.get_type_hints(cls.__init__)
    fields = {}
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        fields[parameter.name] = (hints.get(parameter.name, Any), ...)  # layout() writes every one
    return create_model(f"{cls.__name__}Layout", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def _int_range_problem(value: Any, key: str = "") -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if 0 <= value < MAX_LAYOUT_INT else f"{key or 'a value'} = {value} is out of range"
    if isinstance(value, dict):
        items = [] if {"kind", "layout"} <= set(value) else value.items()  # a nested base checks itself
        return next((p for k, v in items if (p := _int_range_problem(v, str(k)))), None)
    if isinstance(value, list):
        return next((p for v in value if (p := _int_range_problem(v, key))), None)
    return None
