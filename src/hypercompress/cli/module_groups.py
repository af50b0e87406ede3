"""inspect's per-module rows, in model order and grouped across layers.

Modules that differ only in their layer number (the first all-digit part of the name, as in
`model.layers.7.mlp.up_proj`) and share kind and storage layout (bits, group size, rank, the share
of weights a sparse module keeps, its base's layout: the layout minus what names the layer) are one
row, `model.layers.{0-11,14}.mlp.up_proj  quant 4-bit g64  x13`. Rows follow the model (its state
dict's order: embeddings, layer 0, layer 1, ..., head), names the model does not order by their
natural order (layer numbers as numbers, never layers.10 before layers.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

PER_LAYER_KEYS = {"layer"}  # layout keys that restate the layer (a generated linear's)


def describe(kind: str, layout: Mapping[str, Any]) -> str:
    """A module's storage in a few words: 'quant 4-bit g64', 'sparse fp16 50% kept',
    'lora rank 8 on quant 4-bit g64', 'lowrank rank 32'; the kind alone when the layout says no more."""
    parts = [kind]
    if isinstance(layout.get("bits"), int):
        parts.append("fp16" if layout["bits"] == 16 else f"{layout['bits']}-bit")
    if isinstance(layout.get("group_size"), int) and layout["group_size"] > 0:  # 0: no groups (fp16 values)
        parts.append(f"g{layout['group_size']}")
    if layout.get("symmetric") is True:
        parts.append("sym")
    if isinstance(layout.get("rank"), int):
        parts.append(f"rank {layout['rank']}")
    share = _kept_share(layout)
    if share is not None:
        parts.append(f"{share:.0%} kept")
    base = layout.get("base")
    if isinstance(base, dict) and isinstance(base.get("layout"), dict):
        parts.append(f"on {describe(str(base.get('kind')), base['layout'])}")
    return " ".join(parts)


def _kept_share(layout: Mapping[str, Any]) -> float | None:
    """The share of its weights a sparse layout keeps (nnz / (in x out)), else None."""
    nnz, cells = layout.get("nnz"), layout.get("in_features", 0) * layout.get("out_features", 0)
    return nnz / cells if isinstance(nnz, int) and isinstance(cells, int) and cells else None


def _storage_key(layout: Any) -> Any:
    """The layout without what names or counts per layer (the layer index; a sparse module's nnz, as
    the share kept to 0.1%): equal for modules stored alike in different layers."""
    if not isinstance(layout, dict):
        return layout
    share = _kept_share(layout)
    key = {k: _storage_key(v) for k, v in layout.items() if k not in PER_LAYER_KEYS and k != "nnz"}
    if share is not None:
        key["kept"] = round(share, 3)
    return key


def _split_layer(name: str) -> tuple[str, int | None]:
    """(name with its first all-digit part as '{}', that number) or (name, None)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:index] + ["{}"] + parts[index + 1:]), int(part)
    return name, None


@dataclass
class Group:
    """Modules shown as one row: the name pattern, storage, layers, and their summed sizes."""

    pattern: str
    storage: str
    layers: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    params: int = 0
    bits: int = 0

    @property
    def name(self) -> str:
        """The one name, or the pattern with the layers as ranges: model.layers.{0-11,14}.mlp.up_proj."""
        return self.names[0] if len(self.names) == 1 else self.pattern.replace("{}", "{" + ranges(self.layers) + "}", 1)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params if self.params else 0.0


def group_rows(rows: Sequence[dict[str, Any]]) -> list[Group]:
    """Rows (already in order) grouped across layers; a group sits where its first member did."""
    groups: dict[tuple, Group] = {}
    for row in rows:
        pattern, layer = _split_layer(row["name"])
        storage = describe(row["kind"], row["layout"])
        if layer is None:
            key: tuple = ("single", row["name"])
        else:
            key = (pattern, row["kind"], json.dumps(_storage_key(row["layout"]), sort_keys=True, default=str))
        group = groups.setdefault(key, Group(pattern, storage))
        group.names.append(row["name"])
        if layer is not None:
            group.layers.append(layer)
        group.params += row["params"]
        group.bits += row["bits"]
    return list(groups.values())


def ranges(numbers: Iterable[int]) -> str:
    """'0-11,14' for 0..11 and 14: sorted, consecutive runs joined."""
    ordered = sorted(set(numbers))
    runs: list[list[int]] = []
    for number in ordered:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
