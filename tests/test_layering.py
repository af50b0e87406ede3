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
    from hypercompress.layers import module_kinds

    kinds = module_kinds()
    for kind in ("quant", "lowrank", "sparse", "lora", "kan"):
        assert kind in kinds, sorted(kinds)
    assert any(cls.__name__ == "HyperGenerator" for cls in kinds.values())


def test_loading_an_artifact_imports_no_method(model_dirs, tmp_path):
    """Every stored kind lives in layers/, so `hypercompress.load` (in a fresh interpreter) leaves
    hypercompress.methods out of sys.modules; the check sees a method module when one is imported."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from hypercompress.cli import app

    out = tmp_path / "kan"
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--method", "kan", "--set", "steps=1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    probe = ("import sys, hypercompress\n"
             f"hypercompress.load({str(out)!r})\n"
             "{extra}"
             "print(sorted(m for m in sys.modules if m.startswith('hypercompress.methods')))\n")
    for extra, expect_none in (("", True), ("import hypercompress.methods.rtn\n", False)):
        done = subprocess.run([sys.executable, "-c", probe.format(extra=extra)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert (done.stdout.strip().splitlines()[-1] == "[]") is expect_none, done.stdout
