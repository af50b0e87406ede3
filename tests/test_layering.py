"""The house rules on imports: stored kinds (layers/) know nothing of the methods that chose their values."""

from __future__ import annotations

import ast
from pathlib import Path

import hypercompress

PACKAGE = Path(hypercompress.__file__).parent


def imported_modules(path: Path, package: str) -> list[str]:
    """Every module an `import` / `from ... import` in the file (of `package`) names, relative ones resolved."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            names.append(".".join(base + ([node.module] if node.module else [])))
    return names


def test_no_module_under_layers_imports_methods():
    offenders = {str(p.relative_to(PACKAGE)): m for p in sorted((PACKAGE / "layers").glob("*.py"))
                 for m in imported_modules(p, "hypercompress.layers") if m.startswith("hypercompress.methods")}
    assert not offenders, offenders


def test_the_check_catches_a_lazy_relative_import_of_methods(tmp_path):
    """The check can fail: an import of ..methods inside a function of a layers file is caught."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..methods.svd import SVD\n    return SVD\n")
    assert imported_modules(fake, "hypercompress.layers") == ["hypercompress.methods.svd"]


def test_every_stored_kind_is_known_to_the_reader():
    from hypercompress.registry import stored_kinds

    kinds = stored_kinds()
    for kind in ("quant", "lowrank", "sparse", "lora", "kan"):
        assert kind in kinds, sorted(kinds)
    assert any(cls.__name__ == "HyperGenerator" for cls in kinds.values())
