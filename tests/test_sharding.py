"""Sharded (FSDP2) recovery training under torchrun with two CPU processes (gloo): the artifact of a
one-process run, checkpoints sharded per process that resume on another process count, and the
runs sharding cannot take refused with their fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hypercompress
from hypercompress.storage import artifact
from hypercompress.training.checkpoint import shard_rows

from test_cli import run
from test_parallel import _close

QAT = {"method": "qat", "bits": 4, "group_size": 32, "block_steps": 2, "steps": 3, "batch": 2, "micro_batch": 1,
       "lr": 1e-3, "teacher_fraction": 0, "embedding_bits": 4}
# the child SIGKILLs itself once the end-to-end phase's checkpoint of step K is complete (state.json
# replaced); every step checkpoints (CHECKPOINT_SECONDS 0). Under torchrun the launcher stops the rest.
KILLER = """
import os, signal, sys
from hypercompress.storage import atomic
import hypercompress.training.distill as distill
distill.CHECKPOINT_SECONDS = 0.0
from hypercompress.cli import app
real, done = os.replace, []
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith(os.path.join("e2e", "state.json")):
        done.append(dst)
        if len(done) == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace
app(sys.argv[2:], prog_name="hypercompress")
"""


def _args(model_dirs, calib_file, tmp_path, out, **keys):
    recipe = tmp_path / f"{out.name}.json"
    recipe.write_text(json.dumps([{**QAT, **keys}]))
    return ["compress", str(model_dirs["llama"]), "--recipe", str(recipe), "--calib", str(calib_file),
            "--calib-samples", "4", "--calib-len", "32", "--out", str(out), "--json", str(out) + ".json"]


def _env():
    source = str(Path(hypercompress.__file__).parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


def _torchrun(arguments, script: Path | None = None):
    target = [str(script)] if script else ["-m", "hypercompress"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *arguments], capture_output=True, text=True, env=_env(), timeout=600)


def _killer(tmp_path) -> Path:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return script


def _same(a: Path, b: Path) -> None:
    """The same artifact up to the order of float additions: codes equal but for rounding ties."""
    _close(*(load_file(str(p / artifact.WEIGHTS)) for p in (a, b)), codes=1e-3)


def _run_report(out: Path) -> dict:
    return json.loads(Path(str(out) + ".json").read_text())["stages"][0]["training"]["end_to_end"]


@pytest.fixture(scope="module")
def one_process(model_dirs, calib_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    result = run(*_args(model_dirs, calib_file, tmp, tmp / "one"))
    assert result.exit_code == 0, result.output
    return tmp / "one"


@pytest.mark.parametrize("arch,stages", [
    ("llama", [QAT]),
    ("gpt2", [QAT]),  # a tied, quantized embedding trained as the head too; Conv1D's transposed weights
    ("llama", [{"method": "asvd", "rank": 4}, {"method": "distill", "steps": 3, "batch": 2, "micro_batch": 1,
                                              "lr": 3e-3}])])
def test_sharded_training_writes_the_one_process_artifact(arch, stages, model_dirs, calib_file, tmp_path):
    common = ["compress", str(model_dirs[arch]), "--calib", str(calib_file), "--calib-samples", "4",
              "--calib-len", "32"]
    recipes = {}
    for name, extra in (("one", {}), ("fsdp", {"sharding": "fsdp"})):
        recipes[name] = tmp_path / f"{name}.json"
        recipes[name].write_text(json.dumps(stages[:-1] + [{**stages[-1], **extra}]))
    single = run(*common, "--recipe", recipes["one"], "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    launched = _torchrun([*common, "--recipe", str(recipes["fsdp"]), "--out", str(tmp_path / "fsdp"),
                          "--json", str(tmp_path / "fsdp.json")])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert f"{stages[-1]['method']} trained 3 steps" in launched.stdout
    assert launched.stderr.count("drawing calibration windows: done") == 1  # process 0's progress lines only
    assert "on 2 processes, sharded (FSDP2)" in launched.stdout
    report = json.loads((tmp_path / "fsdp.json").read_text())["stages"][-1]["training"]["end_to_end"]
    assert report["sharding"] == "fsdp" and report["processes"] == 2 and report["steps"] == 3
    _same(tmp_path / "fsdp", tmp_path / "one")
    model, _ = artifact.load(tmp_path / "fsdp")
    assert torch.isfinite(model(torch.randint(1, 121, (1, 16))).logits).all()


def test_a_sharded_run_killed_mid_way_resumes_on_one_process_and_back(one_process, model_dirs, calib_file, tmp_path):
    """Killed after step 2's sharded checkpoint (one file per process), resumed by one process; and a
    one-process checkpoint resumed by two sharded processes: both finish the one-process artifact."""
    out = tmp_path / "art"
    killed = _torchrun(["2", *_args(model_dirs, calib_file, tmp_path, out, sharding="fsdp")], _killer(tmp_path))
    assert killed.returncode != 0 and not out.exists()
    e2e = tmp_path / "art.checkpoint" / "stage0" / "e2e"
    state = json.loads((e2e / "state.json").read_text())
    assert state["step"] == 2 and [s["file"].endswith(f"-{i}-of-2.safetensors") for i, s in enumerate(state["shards"])] \
        == [True, True]
    assert all((e2e / s["file"]).is_file() for s in state["shards"])
    resumed = run(*_args(model_dirs, calib_file, tmp_path, out, sharding="fsdp"), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert _run_report(out)["steps"] == 3 and _run_report(out)["resumed_at_step"] == 2  # 1, 2: from the checkpoint
    assert "qat trained 3 steps" in resumed.output and "(resumed at step 2;" in resumed.output
    _same(out, one_process)

    back = tmp_path / "back"
    killed = subprocess.run([sys.executable, "-c", KILLER, "2", *_args(model_dirs, calib_file, tmp_path, back)],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert killed.returncode != 0 and "file" in json.loads(
        (tmp_path / "back.checkpoint" / "stage0" / "e2e" / "state.json").read_text())
    resumed = _torchrun([*_args(model_dirs, calib_file, tmp_path, back, sharding="fsdp"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _run_report(back)["resumed_at_step"] == 2 and _run_report(back)["sharding"] == "fsdp"
    _same(back, one_process)


def test_a_damaged_shard_is_refused_on_resume(model_dirs, calib_file, tmp_path):
    out = tmp_path / "art"
    killed = _torchrun(["2", *_args(model_dirs, calib_file, tmp_path, out, sharding="fsdp")], _killer(tmp_path))
    assert killed.returncode != 0
    e2e = tmp_path / "art.checkpoint" / "stage0" / "e2e"
    shard = e2e / json.loads((e2e / "state.json").read_text())["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x7f" * 8  # a float's bytes: the header still parses
    shard.write_bytes(bytes(data))
    resumed = run(*_args(model_dirs, calib_file, tmp_path, out, sharding="fsdp"), "--resume")
    assert resumed.exit_code == 2 and "sha256" in resumed.output and "Traceback" not in resumed.output


def test_sharding_refuses_what_it_cannot_shard_before_training(model_dirs, calib_file, tmp_path):
    """Adafactor's factored moments are not row shards: a one-line error, no artifact."""
    recipe = tmp_path / "d.json"
    recipe.write_text(json.dumps([{"method": "asvd", "rank": 4},
                                  {"method": "distill", "steps": 2, "batch": 2, "optimizer": "adafactor",
                                   "sharding": "fsdp"}]))
    launched = _torchrun(["compress", str(model_dirs["llama"]), "--recipe", str(recipe), "--calib", str(calib_file),
                          "--calib-samples", "4", "--calib-len", "32", "--out", str(tmp_path / "out")])
    assert launched.returncode != 0 and "exitcode  : 2" in launched.stderr  # torchrun itself exits 1
    assert "sharding=fsdp cannot shard this run: optimizer adafactor" in launched.stderr
    ours = [line for line in launched.stderr.splitlines() if 'File "' in line and "hypercompress" in line]
    assert not ours and not (tmp_path / "out").exists()  # (torchrun prints its own traceback)


def test_bad_sharding_value_is_refused():
    result = run("compress", "smollm2-135m", "--method", "qat", "--set", "sharding=zero3", "--out", "x")
    assert result.exit_code == 2 and "sharding='zero3'" in result.output


@pytest.mark.parametrize("rows,shards", [(10, 3), (7, 8), (0, 2), (64, 2), (5, 1)])
def test_shard_rows_match_torch_chunk(rows, shards):
    pieces = torch.arange(rows).chunk(shards) if rows else ()
    spans = [shard_rows(rows, shards, i) for i in range(shards)]
    assert [b - a for a, b in spans] == [len(p) for p in pieces] + [0] * (shards - len(pieces))
    assert spans[0][0] == 0 and spans[-1][1] == rows


def test_replicated_bytes_counts_the_training_state_and_the_teacher():
    """16 bytes per float32 trained weight (itself, its gradient, two moments), the student's other
    tensors as they are, the teacher at 2 bytes under bf16; one process never shards."""
    from conftest import make_model
    from hypercompress.training.engine import Engine
    from hypercompress.training.sharding import decide, replicated_bytes

    student, teacher = make_model("llama"), make_model("llama")
    params = {"w": student.model.layers[0].mlp.up_proj.weight}
    n, total = params["w"].numel(), sum(p.numel() for p in student.parameters())
    assert replicated_bytes(student, teacher, params, Engine(precision="fp32"), "cpu") == 16 * n + 4 * (total - n) + 4 * total
    assert replicated_bytes(student, teacher, params, Engine(precision="bf16"), "cpu") == 16 * n + 4 * (total - n) + 2 * total
    assert not decide(Engine(sharding="fsdp"), student, teacher, params, device="cpu", optimizer="adamw",
                      generated=False, after_step=False)  # no process group: nothing to shard over


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_time_budget_stops_every_process_at_the_same_step(sharding, model_dirs, calib_file, tmp_path):
    """Each process's clock would shorten the run at its own moment; process 0's count is taken by
    all, so none waits in a collective the others never reach."""
    out = tmp_path / "timed"
    launched = _torchrun(_args(model_dirs, calib_file, tmp_path, out, steps=100000, max_minutes=0.1,
                               block_steps=1, sharding=sharding))
    assert launched.returncode == 0, launched.stderr[-3000:]
    report = _run_report(out)
    assert report["stopped_by_time"] and report["steps"] < 100000 and report["sharding"] == sharding
    assert "(stopped by --max-minutes)" in launched.stdout
