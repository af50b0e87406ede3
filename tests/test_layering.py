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


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every .py under `root` (a package folder);
    imports inside functions (lazy) count, and `from . import x` names the submodule x."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        name = parts[:-1] if parts[-1] == "__init__" else parts
        modules[".".join(name)] = (path, ".".join(parts[:-1]))  # the package relative imports start from

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, package) in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                origin = ".".join(p for p in (base, node.module) if p)
                targets |= {known(f"{origin}.{a.name}") if f"{origin}.{a.name}" in modules else known(origin)
                            for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles_in_the_package():
    """Lazy imports included: a circle tied by an import inside a function is still a circle."""
    assert cycles(import_graph(PACKAGE)) == []


def test_the_circle_check_finds_a_lazy_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("def g():\n    from .a import x\n")
    (package / "d.py").write_text("from . import a\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def design_ranks() -> list[set[str]]:
    """docs/DESIGN.md's ```ranks block: one rank per line, top first, names comma-separated."""
    text = (PACKAGE.parents[1] / "docs" / "DESIGN.md").read_text()
    block = text.split("```ranks\n", 1)[1].split("```", 1)[0]
    return [{name.strip() for name in line.split(",")} for line in block.strip().splitlines()]


def upward_imports(graph: dict[str, set[str]], ranks: list[set[str]]) -> list[str]:
    """'a -> b' for every import from a module to one of a higher rank (a top-level name missing
    from the ranks is reported as such)."""
    rank_of = {name: i for i, names in enumerate(ranks) for name in names}

    def top(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    problems = sorted({f"{top(m)} is in no rank" for m in graph if top(m) not in rank_of})
    for module, targets in graph.items():
        for target in targets:
            a, b = top(module), top(target)
            if a in rank_of and b in rank_of and rank_of[b] < rank_of[a]:
                problems.append(f"{module} -> {target}")
    return problems


def test_imports_point_down_the_ranks_of_docs_design():
    assert upward_imports(import_graph(PACKAGE), design_ranks()) == []


def test_the_rank_check_sees_an_upward_lazy_import(tmp_path):
    package = tmp_path / "hypercompress"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("def f():\n    from .cli import main\n")
    (package / "cli.py").write_text("from .errors import f\n")
    (package / "extra.py").write_text("")
    ranks = [{"hypercompress", "cli"}, {"errors"}]
    assert upward_imports(import_graph(package), ranks) == ["extra is in no rank",
                                                            "hypercompress.errors -> hypercompress.cli"]


def test_the_runner_s_former_module_name_still_imports_it():
    """hypercompress.calibration (the layer-wise runner before it became layerwise.py) re-exports the
    runner and the block capture, so code written against the old name runs on."""
    from hypercompress import block_calls, calibration, layerwise

    assert calibration.run_layerwise is layerwise.run_layerwise
    assert calibration.capture_block_inputs is block_calls.capture_block_inputs
    assert calibration.BlockCalls is block_calls.BlockCalls
