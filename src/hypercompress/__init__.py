"""hypercompress: make Hugging Face causal LMs smaller and prove what it cost.

    result = hypercompress.compress("smollm2-135m", target_bpw=4.0, calib="valid.txt", out="out/smol-4bpw")
    model, tokenizer = hypercompress.load("out/smol-4bpw")

`import hypercompress` loads neither torch nor transformers (the command line answers `--help` at
once): each public name is imported when first used (PEP 562), and the registration with
transformers' Auto classes happens when transformers loads them, so that
`AutoModelForCausalLM.from_pretrained(artifact_dir)` works once hypercompress is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

# public name -> (submodule, attribute)
_EXPORTS = {
    "compress": ("workflow", "compress"),
    "CompressResult": ("workflow", "CompressResult"),
    "apply_recipe": ("apply", "apply_recipe"),
    "analyze": ("analysis.public", "analyze"),
    "edit": ("analysis.public", "edit"),
    "evaluate": ("eval.evaluation", "evaluate"),
    "save": ("storage.artifact", "save"),
    "load": ("storage.artifact", "load"),
    "inspect": ("storage.inspection", "inspect"),
    "export": ("exporters", "export"),
    "prepare": ("kernels", "prepare"),
    "list_methods": ("methods", "list_methods"),
}
_AUTO_MODELS = "transformers.models.auto.modeling_auto"  # where AutoModelForCausalLM lives

__all__ = ["compress", "CompressResult", "apply_recipe", "analyze", "edit", "evaluate", "save", "load", "inspect", "export",
           "prepare", "list_methods"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (and kept); the library is then in use, so it is
    registered with transformers first."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    _register_with_transformers()
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_with_transformers() -> None:
    """AutoModelForCausalLM.from_pretrained(artifact_dir) works (idempotent; storage/hf_integration
    registers when it is imported)."""
    importlib.import_module(".storage.hf_integration", __name__)


class _ThenRegister(importlib.abc.Loader):
    """transformers' own loader of its Auto model classes, followed by the registration."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _register_with_transformers()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...: tracebacks and inspect
        return getattr(self._loader, name)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """An import hook (removed once used) that registers hypercompress the moment transformers
    imports its Auto model classes: importing hypercompress stays free of transformers, and plain
    transformers loads artifacts afterwards all the same."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _AUTO_MODELS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the finders after this one
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


if _AUTO_MODELS in sys.modules:  # transformers' Auto classes are already loaded
    _register_with_transformers()
else:
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
