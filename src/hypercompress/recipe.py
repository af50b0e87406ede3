"""Recipes: an ordered list of stages, each a method config plus module selection patterns.

YAML form (a list of stages, or a mapping with `stages:`)::

    - method: rtn
      bits: 4
      group_size: 64
      targets: ['mlp\\.']        # regexes searched in module names; default: the block linears
      ignore: ['layers\\.0\\.']  # regexes excluded after `targets`

`--set key=value` overrides a key in every stage that has it; `--set 1.key=value` (stage index) or
`--set rtn.key=value` (method name) narrows it to some stages.

A planner recipe is a mapping instead: `target_bpw: 3.0` (or `target_ratio: 5.33`) and optionally
`group_size: 64`; planning/target.py reads it (`load_recipe_file`: a recipe file of either kind)
and the budget planner turns it into stages for the model at hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MethodConfig
from .errors import UserError
from .methods import get_method

SELECTION_KEYS = ("targets", "ignore")


@dataclass
class Stage:
    method: str
    config: MethodConfig
    targets: list[str] | None = None  # None: the architecture's block linears
    ignore: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, **self.config.to_dict()}
        if self.targets is not None:
            out["targets"] = list(self.targets)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Stage":
        if not isinstance(data, dict) or "method" not in data:
            raise UserError(f"{where}: a stage must be a mapping with a 'method' key, e.g. '- method: rtn'; fix the recipe")
        data = dict(data)
        method = str(data.pop("method"))
        entry = get_method(method)
        selection = {k: data.pop(k) for k in SELECTION_KEYS if k in data}
        config = entry.config_cls.from_dict(data, where=f"{where} ({method})")
        targets = _patterns(selection.get("targets"), f"{where}.targets")
        ignore = _patterns(selection.get("ignore"), f"{where}.ignore") or []
        return cls(method, config, targets, ignore)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a mapping naming one key twice is an error (plain YAML keeps the
    last value silently, so `bits: 4` then `bits: 2` in one stage would compress at 2 bits unnoticed)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise _DuplicateKey(key, key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: Any):
        super().__init__(f"key {key!r} twice")
        self.key, self.problem_mark = key, mark


def read_yaml(path: Path) -> Any:
    from .storage.reader import read_document

    if not path.exists():
        raise UserError(f"recipe file not found: {path}; pass an existing YAML file to --recipe")
    try:
        text = read_document(path, limit=1 << 20, fix="pass a YAML recipe file to --recipe")
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise UserError(f"recipe {path} names key {exc.key!r} twice in one mapping (line "
                        f"{exc.problem_mark.line + 1}); keep one") from None
    except (yaml.YAMLError, RecursionError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"recipe {path} is not valid YAML{at}; fix the syntax") from None


@dataclass
class Recipe:
    stages: list[Stage]

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.stages]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_list(), sort_keys=False)

    @classmethod
    def from_list(cls, data: Any, where: str = "recipe") -> "Recipe":
        if isinstance(data, dict) and set(data) <= {"stages", "name"} and "stages" in data:
            data = data["stages"]
        if not isinstance(data, list) or not data:
            raise UserError(f"{where}: expected a non-empty list of stages ; write each stage as '- method: NAME ...'")
        return cls([Stage.from_dict(s, f"{where}[{i}]") for i, s in enumerate(data)])

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        return cls.from_list(read_yaml(path), where=path.name)

    @classmethod
    def single(cls, method: str) -> "Recipe":
        """A one-stage recipe with the method's default config."""
        return cls.from_list([{"method": method}], where=f"--method {method}")

    def with_overrides(self, overrides: list[str]) -> "Recipe":
        """Apply `--set [stage.]key=value` overrides; returns a new, validated recipe."""
        stages = self.to_list()
        for item in overrides:
            scope, key, value = _parse_override(item)
            hits = [i for i, s in enumerate(stages) if _in_scope(i, s, scope)]
            hits = [i for i in hits if key in SELECTION_KEYS or key in _valid_keys(stages[i])]
            if not hits:
                raise UserError(
                    f"--set {item}: no stage has key '{key}'"
                    f"{'' if scope is None else f' in scope {scope!r}'}; valid keys: "
                    + ", ".join(sorted({k for s in stages for k in _valid_keys(s)}))
                )
            for i in hits:
                stages[i][key] = _selection(item, value) if key in SELECTION_KEYS else value
        return Recipe.from_list(stages, where="recipe after --set")


def _selection(item: str, value: str) -> list[str]:
    """targets / ignore from --set: comma-separated regexes (`targets=q_proj,k_proj`) or a YAML list
    (`targets=['embed_tokens$']`; taken as one regex, its brackets would be a character class that
    selects nearly every module)."""
    if value.lstrip().startswith("["):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise UserError(f"--set {item}: not a list of regex strings; write targets=a,b or targets=['a','b']")
        return parsed
    return value.split(",")


def _valid_keys(stage: dict[str, Any]) -> list[str]:
    return get_method(stage["method"]).config_cls.field_names()


def _in_scope(index: int, stage: dict[str, Any], scope: str | None) -> bool:
    return scope is None or scope == str(index) or scope == stage["method"]


def _parse_override(item: str) -> tuple[str | None, str, str]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value or STAGE.key=value; e.g. --set bits=3")
    lhs, value = item.split("=", 1)
    scope, _, key = lhs.rpartition(".")
    if not key:
        raise UserError(f"--set {item!r}: empty key; expected key=value, e.g. --set bits=3")
    return (scope or None), key, value


def _patterns(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: expected a list of regex strings; e.g. targets: ['mlp']")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"{where}: bad regex {pattern!r} ({exc}); fix the pattern") from None
    return value
