"""The extension point: `@register("name", ConfigCls)` on a method class.

A leaf: it imports no method. `hypercompress.methods` imports every built-in method module explicitly
(no package walking) and answers `get_method` / `list_methods` once they are registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import MethodConfig
from .errors import UserError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[MethodConfig]
    method_cls: type


_METHODS: dict[str, MethodEntry] = {}
BUILTIN_METHODS = ("asvd", "distill", "factor_embedding", "gptq", "hypernet", "kan", "kv_lowrank", "qat", "rotate",
                   "rtn", "sparsegpt", "structured", "svd", "wanda")
"""The names `hypercompress.methods` registers, known without importing it (and torch): the command
line refuses a misspelt --method at once (tests/test_cli_startup.py checks the two agree)."""


def check_method_name(name: str) -> None:
    """UserError naming the available methods when `name` is neither built in nor registered."""
    known = sorted(set(BUILTIN_METHODS) | set(_METHODS))
    if name not in known:
        raise UserError(f"unknown method '{name}'; available methods: {', '.join(known)}")


def register(name: str, config_cls: type[MethodConfig]) -> Callable[[type], type]:
    """Class decorator registering a compression method under `name`."""

    def decorate(method_cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = MethodEntry(name, config_cls, method_cls)
        method_cls.name = name
        return method_cls

    return decorate
