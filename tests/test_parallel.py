"""Data-parallel distillation under a launcher: two CPU processes started by torchrun (gloo)
train to the single-process result with the same total batch, and only process 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from hypercompress.storage import artifact

from test_cli import run

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
