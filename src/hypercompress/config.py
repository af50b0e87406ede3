"""Method configurations: dataclasses that round-trip through plain dicts and YAML.

Unknown keys and badly typed values raise `UserError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar

from .errors import UserError


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's config. Subclasses add fields and may override `validate`."""

    version: ClassVar[int] = 1

    def validate(self) -> None:
        """Raise UserError for values out of range. Subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "MethodConfig":
        """Build from a dict, coercing strings from the command line to the field types."""
        known = cls.field_names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(
                f"{where}: unknown key '{unknown[0]}'; valid keys are: {', '.join(known)}"
            )
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        config = cls(**values)
        config.validate()
        return config


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce `value` to the annotated type `hint` (bool, int, float, str, their Optionals)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"{where}: {value!r} is not a finite number; give a finite value in the "
                                "recipe or --set")
            return number
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise UserError(f"{where}: expected {name}, got {value!r}; fix the value in the recipe or --set")


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds (used by `validate`); a message that names no
    fix of its own gets the one every recipe value has."""
    if not condition:
        raise UserError(message if ";" in message else f"{message}; fix the value in the recipe or --set")
