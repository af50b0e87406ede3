"""Kill and resume: a run interrupted at any checkpoint write, of any stage kind that checkpoints,
resumes to a byte-identical model.safetensors; a failed resume keeps the checkpoint."""

from __future__ import annotations

import functools

import pytest
import torch

from hypercompress.storage import artifact, checkpoint as checkpoint_module
from hypercompress.apply import apply_recipe
from hypercompress.training.distill import DistillSettings
from hypercompress.methods import distill_factors
from hypercompress.methods.hypernet import method as hypernet_method
from hypercompress.methods.qat import method as qat_method
from hypercompress.sources.models import load_model
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

GPTQ = {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}
RECIPES = {  # (architecture, stages): each kind of stage that checkpoints or must be restored
    "tied-embedding": ("gpt2", [{"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"^transformer\.wte$"]},
                                GPTQ]),
    "factor-embedding": ("llama", [{"method": "factor_embedding", "rank": 8, "bits": 4,
                                    "targets": [r"^model\.embed_tokens$"]}, GPTQ]),
    "structured": ("llama", [{"method": "structured", "mlp_keep": 0.5, "samples": 2}, GPTQ]),
    "pipeline": ("llama", [{"method": "structured", "drop_layers": 1, "samples": 2},  # as pipeline.py plans
                           {"method": "rtn", "bits": 4, "group_size": -1, "targets": [r"^model\.embed_tokens$"]},
                           {"method": "asvd", "rank": 4}]),
    "kv-lowrank": ("llama", [{"method": "kv_lowrank", "rank": 16, "samples": 2},
                             {**GPTQ, "targets": ["mlp"]}]),
    "gptq-then-distill": ("llama", [GPTQ, {"method": "distill", "steps": 4, "batch": 2}]),
    "distill-with-relora": ("llama", [{"method": "rtn", "bits": 4, "group_size": 32},  # no checkpoint
                                      {"method": "distill", "steps": 4, "batch": 2, "lora_rank": 2,
                                       "relora_every": 2}]),
    "hypernet": ("llama", [{"method": "hypernet", "warm_steps": 2, "steps": 4}]),
    "gptq-then-qat": ("llama", [GPTQ, {"method": "qat", "block_steps": 2, "steps": 4, "batch": 2}]),
    "qat-with-embedding": ("gpt2", [{"method": "qat", "bits": 4, "group_size": 32, "embedding_bits": 4,
                                     "block_steps": 2, "steps": 4, "batch": 2}]),
}


REAL_REPLACE_FILE = checkpoint_module.replace_file


class Killed(BaseException):
    """Stands for the process dying: nothing catches it."""


def calib():
    return torch.randint(1, 121, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def frequent_distill_checkpoints(monkeypatch):
    """Distillation checkpoints every 2 steps here (50 in real runs), so short runs hold some."""
    for module in (distill_factors, hypernet_method, qat_method):
        monkeypatch.setattr(module, "DistillSettings", functools.partial(DistillSettings, checkpoint_every=2))


def kill_at_write(monkeypatch, k: int | None, after: bool = False) -> list[str]:
    """Make the k-th checkpoint write (1-based) die before it starts (or, `after`, once it is done);
    returns the written names."""
    writes: list[str] = []

    def replace_file(path, write):
        writes.append(path.name)
        if len(writes) == k and not after:
            raise Killed
        REAL_REPLACE_FILE(path, write)
        if len(writes) == k and after:
            raise Killed

    monkeypatch.setattr(checkpoint_module, "replace_file", replace_file)
    return writes


def run(model_dir, stages, out, resume=False):
    loaded = load_model(str(model_dir))
    params = count_params(loaded.model)
    torch.manual_seed(0)
    apply_recipe(loaded.model, Recipe.from_list(stages), calib(), batch_size=2,
             checkpoint_dir=out.with_name(out.name + ".checkpoint"), resume=resume)
    return artifact.save(loaded.model, loaded.tokenizer, out, recipe=stages, original_params=params)


@pytest.mark.parametrize("kind", RECIPES)
def test_a_kill_at_every_checkpoint_write_resumes_byte_identical(kind, model_dirs, tmp_path, monkeypatch):
    arch, stages = RECIPES[kind]
    writes = kill_at_write(monkeypatch, None)
    reference = (run(model_dirs[arch], stages, tmp_path / "reference") / artifact.WEIGHTS).read_bytes()
    total = len(writes)
    assert total >= 1, writes  # the run.json claim and the checkpoints
    for k, after in [(k, False) for k in range(1, total + 1)] + [(total, True)]:
        out = tmp_path / f"killed-{k}-{after}"
        kill_at_write(monkeypatch, k, after)
        with pytest.raises(Killed):
            run(model_dirs[arch], stages, out)
        assert (out.parent / f"{out.name}.checkpoint").is_dir() and not out.exists()
        kill_at_write(monkeypatch, None)
        resumed = run(model_dirs[arch], stages, out, resume=True)
        assert (resumed / artifact.WEIGHTS).read_bytes() == reference, f"{kind}: killed at write {k} of {writes}"
        assert not (out.parent / f"{out.name}.checkpoint").exists()


def test_a_resume_killed_again_still_resumes(model_dirs, tmp_path, monkeypatch):
    arch, stages = RECIPES["tied-embedding"]
    reference = (run(model_dirs[arch], stages, tmp_path / "reference") / artifact.WEIGHTS).read_bytes()
    out = tmp_path / "twice"
    kill_at_write(monkeypatch, 3)
    with pytest.raises(Killed):
        run(model_dirs[arch], stages, out)
    kill_at_write(monkeypatch, 2)
    with pytest.raises(Killed):
        run(model_dirs[arch], stages, out, resume=True)
    kill_at_write(monkeypatch, None)
    assert (run(model_dirs[arch], stages, out, resume=True) / artifact.WEIGHTS).read_bytes() == reference


def run_workflow(model_dir, stages, out, resume=False):
    import hypercompress

    return hypercompress.compress(str(model_dir), stages, calib(), calib_batch=2, out=out, resume=resume).out


@pytest.mark.parametrize("kind", ["tied-embedding", "gptq-then-qat"])
def test_every_file_of_a_resumed_artifact_is_byte_identical(kind, model_dirs, tmp_path, monkeypatch):
    """Through the user's path (summary.json, summary.md and the manifest included): a kill at every
    checkpoint write, the stage rows' own file among them, then --resume, writes the artifact of an
    uninterrupted run, every file byte for byte (a skipped pass still has its row in the summary)."""
    arch, stages = RECIPES[kind]
    writes = kill_at_write(monkeypatch, None)
    reference = run_workflow(model_dirs[arch], stages, tmp_path / "reference")
    expected = {p.name: p.read_bytes() for p in sorted(reference.iterdir())}
    assert "summary.json" in expected and "summary.md" in expected
    for k, after in [(k, False) for k in range(1, len(writes) + 1)] + [(len(writes), True)]:
        out = tmp_path / f"killed-{k}-{after}"
        kill_at_write(monkeypatch, k, after)
        with pytest.raises(Killed):
            run_workflow(model_dirs[arch], stages, out)
        kill_at_write(monkeypatch, None)
        resumed = run_workflow(model_dirs[arch], stages, out, resume=True)
        got = {p.name: p.read_bytes() for p in sorted(resumed.iterdir())}
        assert got.keys() == expected.keys(), (k, after)
        differing = [name for name in expected if got[name] != expected[name]]
        assert not differing, f"{kind}: killed at write {k} ({after}) of {writes}: {differing} differ"
