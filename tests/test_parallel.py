"""Data-parallel distillation under a launcher: two CPU processes started by torchrun (gloo)
train to the single-process result with the same total batch, and only process 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import hypercompress
from hypercompress.storage import artifact

from test_cli import run
from test_interrupted_writes import KILLER

# KL only: the per-block matching normalizes by each process's share of the batch, so it is
# equal to the single-process loss in expectation, not bit for bit
RECIPE = [{"method": "asvd", "rank": 4},
          {"method": "distill", "steps": 4, "batch": 4, "lr": 3e-3, "local_weight": 0, "stability_weight": 0}]


def test_two_processes_train_as_one_and_only_the_first_writes(model_dirs, calib_file, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(RECIPE))
    common = ["compress", str(model_dirs["llama"]), "--recipe", str(recipe), "--calib", str(calib_file),
              "--calib-samples", "4", "--calib-len", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "hypercompress", *common, "--out", str(tmp_path / "ddp")],
                              capture_output=True, text=True, env=env, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("where the time went") == 1  # one report, from process 0
    single = run(*common, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    plain = run(*common[:2], "--method", "asvd", "--set", "rank=4", *common[4:], "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    ddp, one, untrained = (load_file(str(tmp_path / d / artifact.WEIGHTS)) for d in ("ddp", "one", "plain"))
    assert ddp.keys() == one.keys()
    gap = max((ddp[k].float() - one[k].float()).abs().max().item() for k in ddp)
    trained = max((untrained[k].float() - one[k].float()).abs().max().item() for k in one)
    assert gap < 1e-4 < trained / 10  # the same steps, up to float16 rounding
    assert not (tmp_path / "ddp.checkpoint").exists()
    assert torch.isfinite(artifact.load(tmp_path / "ddp")[0](torch.randint(1, 121, (1, 16))).logits).all()


def test_qat_under_two_processes_writes_the_one_process_artifact(model_dirs, calib_file, tmp_path):
    """Block-AP and the end-to-end phase split each step's micro-batches between the processes (gloo)
    and sum the gradients: with the same micro_batch the artifact is the one-process one."""
    recipe = tmp_path / "qat.json"
    recipe.write_text(json.dumps([{"method": "qat", "bits": 4, "group_size": 32, "block_steps": 2, "steps": 3,
                                   "batch": 2, "micro_batch": 1, "lr": 1e-3, "teacher_fraction": 0}]))
    common = ["compress", str(model_dirs["llama"]), "--recipe", str(recipe), "--calib", str(calib_file),
              "--calib-samples", "4", "--calib-len", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "hypercompress", *common, "--out", str(tmp_path / "ddp")],
                              capture_output=True, text=True, env=env, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("where the time went") == 1
    single = run(*common, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    ddp, one = (load_file(str(tmp_path / d / artifact.WEIGHTS)) for d in ("ddp", "one"))
    assert ddp.keys() == one.keys()
    for key in one:
        if one[key].dtype in (torch.uint8, torch.int8, torch.int32):  # packed codes: equal but for rounding ties
            assert (ddp[key] != one[key]).float().mean() < 1e-3, key
        else:
            assert torch.allclose(ddp[key].float(), one[key].float(), atol=1e-3), key
    model, _ = artifact.load(tmp_path / "ddp")
    assert torch.isfinite(model(torch.randint(1, 121, (1, 16))).logits).all()


GPTQ = "- method: gptq\n  bits: 4\n  group_size: 32\n"
def _gptq_args(model_dirs, calib_file, tmp_path, out):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ)
    return ["compress", str(model_dirs["llama"]), "--recipe", str(recipe), "--calib", str(calib_file),
            "--calib-samples", "6", "--calib-len", "32", "--calib-batch", "1", "--out", str(out)]


def _launch(arguments, env=None, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    target = [script] if script else ["-m", "hypercompress"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *arguments], capture_output=True, text=True, env=env, timeout=600)


def _close(a: dict, b: dict, codes: float = 1e-2) -> None:
    """The same artifact up to the order of float additions (the processes' Hessians, gradients):
    codes equal but for rounding ties (at most the share `codes` differs), scales to float16 rounding."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype in (torch.uint8, torch.int8, torch.int32):
            assert (a[key] != b[key]).float().mean() < codes, key
        else:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-3), key


def test_gptq_splits_its_calibration_batches_between_two_processes(model_dirs, calib_file, tmp_path):
    """Each process observes half of the batches; the Hessian sums are added before every solve, so
    both compress alike and process 0 writes the one-process artifact."""
    launched = _launch([*_gptq_args(model_dirs, calib_file, tmp_path, tmp_path / "two"),
                        "--json", str(tmp_path / "two.json")])
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = run(*_gptq_args(model_dirs, calib_file, tmp_path, tmp_path / "one"), "--json", tmp_path / "one.json")
    assert single.exit_code == 0, single.output
    two, one = (load_file(str(tmp_path / d / artifact.WEIGHTS)) for d in ("two", "one"))
    _close(two, one)
    rows = {name: json.loads((tmp_path / f"{name}.json").read_text())["stages"][0] for name in ("two", "one")}
    assert rows["two"]["calibration_processes"] == 2 and "calibration_processes" not in rows["one"]


def test_a_two_process_gptq_run_killed_mid_way_resumes_on_one_process(model_dirs, calib_file, tmp_path):
    """The checkpoint holds every calibration batch (gathered to process 0), so a run killed under
    torchrun resumes with another number of processes and writes the same artifact."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)  # under torchrun process 0 writes: it kills itself, the launcher stops the other
    out = tmp_path / "art"
    source = str(Path(hypercompress.__file__).parents[1])
    killed = _launch(["checkpoint", "6", *_gptq_args(model_dirs, calib_file, tmp_path, out)], script=str(script),
                     env={"PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])})
    assert killed.returncode != 0 and not out.exists()
    state = json.loads((tmp_path / "art.checkpoint" / "state.json").read_text())
    assert 0 <= state["block"] < 1  # killed after block 0 of the 2, before the end
    resumed = run(*_gptq_args(model_dirs, calib_file, tmp_path, out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    reference = run(*_gptq_args(model_dirs, calib_file, tmp_path, tmp_path / "one"))
    assert reference.exit_code == 0, reference.output
    _close(*(load_file(str(p / artifact.WEIGHTS)) for p in (out, tmp_path / "one")))
