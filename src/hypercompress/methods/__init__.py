"""Built-in methods. Importing this package registers each of them (explicitly, no package walk)."""

from . import asvd, gptq, rtn, sparsegpt, svd, wanda  # noqa: F401
from .hypernet import method as _hypernet  # noqa: F401
from .kan import method as _kan  # noqa: F401
from .qat import method as _qat  # noqa: F401
from . import distill_factors, factor_embedding, kv_lowrank, rotation  # noqa: F401
from .structured import method as _structured  # noqa: F401

from ..registry import _METHODS, MethodEntry, check_method_name  # noqa: E402  (after the registrations)


def get_method(name: str) -> MethodEntry:
    """The registered method `name` (built in, or registered since); UserError naming the available
    ones otherwise."""
    check_method_name(name)
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)
