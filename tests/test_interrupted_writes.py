"""The CLI killed for real (SIGKILL) inside a checkpoint write and inside the final artifact write:
no complete-looking folder is left, --resume finishes the byte-identical artifact, the hidden
partial folders of dead writers are cleaned; a failed resume keeps the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hypercompress
from hypercompress.storage import atomic
from hypercompress.cli import app
from hypercompress.errors import UserError

RECIPE = """- method: rtn
  bits: 4
  group_size: 32
  targets: ['^transformer\\.wte$']
- method: gptq
  bits: 4
  group_size: 32
"""
# runs the CLI in a child that SIGKILLs itself at the K-th file rename (WHERE=checkpoint: after the
# temporary file is written, before the rename) or just before the artifact's folder is renamed
KILLER = """
import os, signal, sys
from hypercompress.storage import atomic
from hypercompress.cli import app
where, k, calls = sys.argv[1], int(sys.argv[2]), []
real_replace, real_sync = os.replace, atomic._sync_tree
def replace(src, dst):
    if ".tmp-" in str(src):  # atomic.replace_file's renames only
        calls.append(dst)
    if where == "checkpoint" and ".tmp-" in str(src) and len(calls) == k:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
def sync_tree(directory):
    real_sync(directory)
    if where == "artifact":
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace, atomic._sync_tree = replace, sync_tree
app(sys.argv[3:], prog_name="hypercompress")
"""


def args(model_dirs, calib_file, tmp_path, out):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return ["compress", str(model_dirs["gpt2"]), "--recipe", str(recipe), "--calib", str(calib_file),
            "--calib-samples", "4", "--calib-len", "16", "--calib-batch", "2", "--out", str(out)]


def cli(arguments):
    return CliRunner().invoke(app, arguments)


def killed_child(where: str, k: int, arguments: list[str]) -> subprocess.CompletedProcess:
    source = str(Path(hypercompress.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLER, where, str(k), *arguments], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(model_dirs, calib_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    result = cli(args(model_dirs, calib_file, tmp, tmp / "art"))
    assert result.exit_code == 0, result.output
    return (tmp / "art" / "model.safetensors").read_bytes()


def test_sigkill_inside_a_checkpoint_write_then_resume(reference, model_dirs, calib_file, tmp_path):
    out = tmp_path / "art"
    # file renames: run.json, stages.json (the rtn pass's row), block 0's new modules, hidden states and
    # state, then block 1's: killed after block 1's modules and hidden-states files are in place but
    # before state.json points to them
    child = killed_child("checkpoint", 8, args(model_dirs, calib_file, tmp_path, out))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    folder = tmp_path / "art.checkpoint"
    assert not out.exists() and json.loads((folder / "state.json").read_text())["block"] == 0
    assert len(list(folder.glob("tensors-1-*.safetensors"))) == 2  # block 1's, not yet pointed to
    refused = cli(args(model_dirs, calib_file, tmp_path, out))  # a fresh run says what to do
    assert refused.exit_code == 2 and "--resume" in refused.output and "rm -r" in refused.output
    result = cli(args(model_dirs, calib_file, tmp_path, out) + ["--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "recipe.yaml"]


def test_sigkill_inside_the_artifact_write_then_resume(reference, model_dirs, calib_file, tmp_path):
    out = tmp_path / "art"
    child = killed_child("artifact", 0, args(model_dirs, calib_file, tmp_path, out))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not out.exists()  # nothing that looks complete
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".art.partial-")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert (tmp_path / "art.checkpoint" / "state.json").is_file()  # the work is not lost
    result = cli(args(model_dirs, calib_file, tmp_path, out) + ["--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "recipe.yaml"]  # the partial removed


def test_a_failed_resume_keeps_the_checkpoint(reference, model_dirs, calib_file, tmp_path, monkeypatch):
    out = tmp_path / "art"
    child = killed_child("checkpoint", 7, args(model_dirs, calib_file, tmp_path, out))  # block 1's hidden states
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    orphans = list((tmp_path / "art.checkpoint").glob(".tensors-*.tmp-*"))
    assert len(orphans) == 1  # the file being written when the child died

    def full_disk(*_args, **_kwargs):
        raise UserError("no space left on the device; free some space")

    monkeypatch.setattr("hypercompress.workflow.artifact.save", full_disk)
    failed = cli(args(model_dirs, calib_file, tmp_path, out) + ["--resume"])
    assert failed.exit_code == 2 and (tmp_path / "art.checkpoint" / "state.json").is_file()
    assert not orphans[0].exists()  # a later save removed the dead writer's temporary file
    monkeypatch.undo()
    result = cli(args(model_dirs, calib_file, tmp_path, out) + ["--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() == reference


def test_only_dead_writers_partial_folders_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic._host_tag()
    names = {"dead": f".out.partial-{host}-{dead.pid}-abc", "live": f".out.partial-{host}-{os.getppid()}-abc",
             "other host": f".out.partial-00000000-{dead.pid}-abc", "not ours": ".out.partial-x1y2",
             "other out": f".other.partial-{host}-{dead.pid}-abc"}
    for name in names.values():
        (tmp_path / name).mkdir()
    with atomic.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("x")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out"} | {n for k, n in names.items() if k != "dead"}


class Killed(BaseException):
    pass


def test_a_kill_inside_a_file_write_leaves_the_old_file(tmp_path):
    """replace_file (checkpoints, --json reports, plots): the old content or the new, never half."""
    report = tmp_path / "report.json"
    report.write_text('{"old": true}')

    def half_then_killed(tmp):
        tmp.write_text('{"new": ')
        raise Killed

    with pytest.raises(Killed):
        atomic.replace_file(report, half_then_killed)
    assert report.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic.replace_file(report, lambda tmp: tmp.write_text('{"new": true}'))
    assert report.read_text() == '{"new": true}'


def test_a_killed_checkpoint_removal_leaves_no_torn_checkpoint(tmp_path):
    """discard renames the folder away before deleting it; what a killed removal left (its writer
    gone) goes at the next removal of that folder."""
    from hypercompress.storage.checkpoint import discard

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".art.checkpoint.removed-{dead.pid}").mkdir()
    (tmp_path / "art.checkpoint").mkdir()
    (tmp_path / "art.checkpoint" / "state.json").write_text("{}")
    discard(tmp_path / "art.checkpoint")
    assert list(tmp_path.iterdir()) == []
