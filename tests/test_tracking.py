"""Experiment tracking: trained methods write TensorBoard events and W&B offline runs; the compress
summary goes to the same places; bad tracking settings are one-line errors."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.recipe import Recipe
from hypercompress.tracking import Tracker, destinations, log_compress_summary

from conftest import make_model

CALIB = torch.randint(1, 121, (6, 16), generator=torch.Generator().manual_seed(0))
RTN = {"method": "rtn", "bits": 4, "group_size": 32}
TRAINED = {  # method -> (recipe stages before the logged one, its settings, the tags it must write)
    "distill": ([{"method": "svd", "rank": 8}], {"steps": 3, "batch": 2},
                ["distill/loss", "distill/kl", "distill/local", "distill/stability", "distill/tokens_per_second",
                 "distill/lr"]),
    "qat": ([RTN], {"block_steps": 2, "steps": 2, "batch": 2, "teacher_fraction": 0.0},
            ["qat/block_ap/loss", "qat/block_ap/lr", "qat/block_ap/tokens_per_second", "qat/loss", "qat/kl",
             "qat/lr", "qat/lr_1", "qat/tokens_per_second"]),
    "hypernet": ([], {"warm_steps": 2, "steps": 2, "batch": 2, "encoder_init": False},
                 ["hypernet/warm/loss", "hypernet/warm/lr", "hypernet/loss", "hypernet/kl", "hypernet/lr",
                  "hypernet/tokens_per_second"]),
    "kan": ([], {"steps": 3, "num_levels": 2, "batch": 256},
            ["kan/loss", "kan/level", "kan/lr", "kan/entries_per_second"]),
}
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard does not install here (pip install tensorboard)")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb does not install here (pip install wandb)")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """W&B never reaches a network and writes only under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in log_dir -> [(step, value)], read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "wandb").glob("offline-run-*") if p.is_dir())


def run_records(run: Path, keys: list[str], seconds: float = 20.0) -> bytes:
    """The bytes of the run's .wandb record file (protobuf records: logged keys appear as plain
    strings), once it holds every key; wandb-core's writer may still be flushing just after finish()."""
    deadline = time.monotonic() + seconds
    while True:
        files = list(run.glob("run-*.wandb"))
        data = files[0].read_bytes() if files else b""
        if all(key.encode() in data for key in keys) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def train(method: str, tmp_path: Path, **tracking) -> None:
    before, settings, _ = TRAINED[method]
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([*before, {"method": method, **settings, **tracking}]), CALIB)


@needs_tensorboard
@pytest.mark.parametrize("method", sorted(TRAINED))
def test_each_trained_method_writes_its_tags_to_tensorboard(method, tmp_path):
    train(method, tmp_path, log_dir=str(tmp_path / "tb"))
    found = scalars(tmp_path / "tb")
    missing = [tag for tag in TRAINED[method][2] if tag not in found]
    assert not missing, f"{method} wrote {sorted(found)}"
    loss = found[f"{method}/loss"]
    assert [step for step, _ in loss] == list(range(1, len(loss) + 1))  # one point per optimizer step
    assert all(torch.isfinite(torch.tensor(v)) and v >= 0 for _, v in loss)
    if method != "kan":  # the cosine schedule: the learning rate falls from its configured value
        lr = [v for _, v in found[f"{method}/lr"]]
        assert lr[0] == pytest.approx(TRAINED[method][1].get("lr", lr[0])) and lr[-1] < lr[0]


def test_distill_lr_is_the_configured_schedule(tmp_path):
    """lr logged per step is the optimizer's: lr at step 1, then cosine decay (to 10% at the end)."""
    pytest.importorskip("tensorboard")
    before, settings, _ = TRAINED["distill"]
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list([*before, {"method": "distill", **settings, "lr": 1e-3,
                                                "log_dir": str(tmp_path / "tb")}]), CALIB)
    lr = [v for _, v in scalars(tmp_path / "tb")["distill/lr"]]
    expected = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / 3))) for s in range(3)]
    assert lr == pytest.approx(expected, rel=1e-5)


@needs_wandb
@pytest.mark.parametrize("method", ["distill", "kan"])
def test_a_wandb_offline_run_writes_its_files(method, tmp_path):
    train(method, tmp_path, wandb_project="hc-test", wandb_dir=str(tmp_path / "wb"))
    runs = wandb_runs(tmp_path / "wb")
    assert len(runs) == 1, f"expected one offline run under {tmp_path / 'wb'}: {runs}"
    assert (runs[0] / "files").is_dir() and (runs[0] / "logs").is_dir()
    keys = [f"{method}/loss", f"{method}/lr", f"{method}/step", "hc-test"]  # the history's keys, the project
    history = run_records(runs[0], keys)
    assert [key for key in keys if key.encode() not in history] == [], "not in the run's records"


@needs_wandb
def test_wandb_goes_next_to_the_tensorboard_logs_by_default(tmp_path):
    pytest.importorskip("tensorboard")
    train("distill", tmp_path, log_dir=str(tmp_path / "logs"), wandb_project="hc-test")
    assert len(wandb_runs(tmp_path / "logs")) == 1
    assert "distill/loss" in scalars(tmp_path / "logs")


@needs_tensorboard
def test_the_compress_summary_is_logged_to_the_recipe_s_destinations(tmp_path):
    recipe = Recipe.from_list([RTN, {"method": "distill", "steps": 1, "log_dir": str(tmp_path / "tb")}])
    summary = {"model": "tiny", "recipe": recipe.to_list(), "bits_per_weight": 4.5, "safetensors_bytes": 1234,
               "original_params": 2000, "out": "somewhere",
               "branches": [{"branch": "original (16-bit)", "weights": 2000, "bytes": 4000, "bits_per_weight": 16.0,
                             "ratio_vs_16bit": 1.0, "ppl": 30.0, "kl": None, "top1": None},
                            {"branch": "0: rtn", "weights": 2000, "bytes": 1200, "bits_per_weight": 4.8,
                             "ratio_vs_16bit": 3.33, "ppl": 33.0, "kl": 0.05, "top1": 0.9}]}
    assert destinations(recipe.stages) == [{"log_dir": str(tmp_path / "tb"), "wandb_project": None, "wandb_dir": None}]
    assert log_compress_summary(summary, recipe) == [str(tmp_path / "tb")]
    found = scalars(tmp_path / "tb")
    assert found["summary/bits_per_weight"] == [(0, 4.5)]
    assert found["summary/safetensors_bytes"] == [(0, 1234.0)]
    assert found["summary/branches/ppl"] == [(0, 30.0), (1, 33.0)]
    assert [v for _, v in found["summary/branches/kl"]] == [pytest.approx(0.05)]  # the original has none
    assert log_compress_summary(summary, Recipe.from_list([RTN])) == []  # no stage asks for logging


@needs_wandb
def test_the_compress_summary_goes_to_wandb(tmp_path):
    summary = {"bits_per_weight": 3.25, "branches": [{"branch": "0: rtn", "bits_per_weight": 3.25, "ppl": 40.0,
                                                      "kl": 0.1}]}
    assert log_compress_summary(summary, wandb_project="hc-test", wandb_dir=str(tmp_path)) == ["wandb:hc-test"]
    runs = wandb_runs(tmp_path)
    assert len(runs) == 1
    keys = ["summary/bits_per_weight", "summary/branches"]
    record = run_records(runs[0], keys)
    assert [key for key in keys if key.encode() not in record] == []
    assert list((runs[0] / "files" / "media" / "table" / "summary").glob("branches_*.table.json"))


def test_a_tracker_without_destinations_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Tracker("distill") as tracker:
        assert not tracker.active
        tracker.log({"loss": 1.0}, 1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", sorted(TRAINED))
@pytest.mark.parametrize("values,needle", [
    ({"wandb_project": "a/b"}, "wandb_project='a/b'"),
    ({"wandb_project": " "}, "W&B project name"),
    ({"wandb_dir": "somewhere"}, "wandb_dir is set but wandb_project is not"),
    ({"log_dir": __file__}, "is a file, not a folder"),
])
def test_bad_tracking_settings_are_one_line_errors(method, values, needle):
    with pytest.raises(UserError, match="^[^\n]*$") as caught:
        Recipe.from_list([{"method": method, **values}])
    assert needle in str(caught.value)


@pytest.mark.parametrize("package,key", [("tensorboard", "log_dir"), ("wandb", "wandb_project")])
def test_a_missing_package_names_its_pip_install(package, key, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(UserError, match=f"pip install {package}"):
        Recipe.from_list([{"method": "distill", key: "x"}])


@pytest.mark.parametrize("value,needle", [("", "log_dir is empty"), (__file__, "is a file, not a folder")])
def test_compress_refuses_a_log_dir_that_cannot_be_one_before_any_work(value, needle, model_dirs, tmp_path):
    import hypercompress

    with pytest.raises(UserError, match=needle):
        hypercompress.compress(str(model_dirs["llama"]), method="rtn", out=tmp_path / "o", log_dir=value)
    assert not (tmp_path / "o").exists()
