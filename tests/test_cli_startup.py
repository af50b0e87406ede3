"""`hypercompress --help` and a bad option answer without importing torch, transformers or tqdm; the
lazy `import hypercompress` still registers artifacts with transformers' Auto classes.

Each check runs in a fresh interpreter (this one has long imported torch) and reads sys.modules
afterwards; never the wall clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hypercompress.cli import app

HEAVY = ("torch", "transformers", "tqdm")  # tqdm: a command sets TQDM_DISABLE before it is imported
COMMANDS = ["compress", "evaluate", "inspect", "export", "env", "plot", "analyze", "edit"]
_REPORT = "MODULES:"


def fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def run_app(args: list[str]) -> tuple[int, str, str, dict[str, bool]]:
    """(exit code, stdout, stderr, {heavy module: imported}) of the app run on `args` in a fresh
    interpreter."""
    code = ("import json, sys\n"
            "from hypercompress.cli import app\n"
            "try:\n"
            f"    app({args!r})\n"
            "    code = 0\n"
            "except SystemExit as exc:\n"
            "    code = exc.code or 0\n"
            f"print({_REPORT!r} + json.dumps({{'code': code, **{{m: m in sys.modules for m in {HEAVY!r}}}}}))\n")
    done = fresh_python(code)
    out, _, report = done.stdout.rpartition(_REPORT)
    assert report, done.stdout + done.stderr
    data = json.loads(report)
    return data.pop("code"), out, done.stderr, data


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS)], ids=" ".join)
def test_help_imports_neither_torch_nor_transformers(args):
    code, out, err, imported = run_app(args)
    assert code == 0, err
    assert "Usage" in out and "Traceback" not in err
    assert imported == {m: False for m in HEAVY}


@pytest.mark.parametrize("args, needle", [
    (["compress", "some/model", "--method", "rtn"], "Missing option '--out'"),
    (["evaluate", "art", "--seq-len", "1"], "--seq-len"),
    (["nonsense"], "No such command"),
    (["compress", "some/model", "--method", "rnt", "--out", "new-out"], "unknown method 'rnt'; available methods: asvd"),
    (["compress", "some/model", "--method", "rtn", "--out", "."], "already exists and is not empty"),
    (["compress", "some/model", "--method", "rtn", "--out", __file__], "already exists and is not a folder"),
    (["compress", "some/model", "--method", "gptq", "--calib", "nope.txt", "--out", "new-out"],
     "--calib nope.txt: file not found"),
    (["evaluate", "art", "--data", "nope.txt"], "--data nope.txt: file not found"),
    (["analyze", "some/model", "--calib", "nope.txt", "--out", "new-out"], "--calib nope.txt: file not found"),
    (["edit", "some/model", "--concept", "c.txt", "--contrast", "k.txt", "--unrelated", "u.txt", "--out", "new-out"],
     "--concept c.txt: file not found"),
], ids=["missing option", "out of range", "unknown command", "misspelt method", "existing --out", "a file as --out",
        "missing --calib", "missing --data", "missing analyze --calib", "missing edit files"])
def test_a_bad_option_is_one_line_before_any_import(args, needle):
    code, out, err, imported = run_app(args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert imported == {m: False for m in HEAVY}


def test_import_hypercompress_is_light_and_exports_its_names_on_use():
    code = ("import json, sys\n"
            "import hypercompress\n"
            "light = {m: m in sys.modules for m in ('torch', 'transformers')}\n"
            "names = {n: callable(getattr(hypercompress, n)) for n in hypercompress.__all__}\n"
            "print(json.dumps([light, names, hypercompress.__version__, 'load' in dir(hypercompress)]))\n")
    done = fresh_python(code)
    assert done.returncode == 0, done.stderr
    light, names, version, listed = json.loads(done.stdout.splitlines()[-1])
    assert light == {"torch": False, "transformers": False}
    assert names == {n: True for n in names} and set(names) >= {"compress", "load", "evaluate", "list_methods"}
    assert version and listed


def test_an_unknown_name_is_an_attribute_error():
    import hypercompress

    with pytest.raises(AttributeError, match="no_such_thing"):
        hypercompress.no_such_thing  # noqa: B018


@pytest.fixture(scope="module")
def artifact(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("startup") / "llama-rtn"
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--method", "rtn", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("first", ["import transformers", "hypercompress.load(ARTIFACT)", "pass"])
def test_plain_transformers_loads_an_artifact_once_hypercompress_is_imported(artifact, first):
    """Whatever comes first after `import hypercompress` (transformers itself, the library, nothing),
    AutoModelForCausalLM.from_pretrained(artifact_dir) builds the compressed model."""
    code = ("import sys\n"
            f"ARTIFACT = {str(artifact)!r}\n"
            "import hypercompress\n"
            "assert 'transformers' not in sys.modules\n"
            f"{first}\n"
            "from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(ARTIFACT)\n"
            "print(type(model).__name__, len(model.hypercompress_backends))\n")
    done = fresh_python(code)
    assert done.returncode == 0, done.stderr
    name, backends = done.stdout.split()[-2:]
    assert name == "LlamaForCausalLM" and int(backends) > 0


def test_transformers_imported_first_is_registered_at_import(artifact):
    code = ("import transformers.models.auto.modeling_auto\n"
            "import hypercompress\n"
            "from transformers import AutoModelForCausalLM\n"
            f"print(type(AutoModelForCausalLM.from_pretrained({str(artifact)!r})).__name__)\n")
    done = fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "LlamaForCausalLM"


def test_the_method_names_known_without_torch_are_the_registered_ones():
    from hypercompress.methods import list_methods
    from hypercompress.registry import BUILTIN_METHODS

    assert sorted(BUILTIN_METHODS) == list_methods()


@pytest.mark.parametrize("given, expected", [(None, "30000"), ("5", "5")])
def test_the_command_sets_openmp_spinning_before_torch_loads_and_keeps_a_users_value(given, expected):
    """GNU OpenMP's spin count (cli.OMP_SPIN_COUNT: torch's threads on shared cores) is set before
    torch is imported, unless the user set one."""
    code = ("import os, sys\n"
            "sys.argv = ['hypercompress', '--help']\n"
            "from hypercompress.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"False {expected}"
