"""hypercompress.compress from Python does what the CLI does (the CLI calls it): the README's
notebook example runs here on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import hypercompress
from hypercompress.storage import artifact
from hypercompress.errors import UserError
from hypercompress.layers.base import CompressedModule
from hypercompress.recipe import Recipe

from conftest import make_model, make_tokenizer
from test_cli import run

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The Python block after the README's 'test: tests/test_workflow.py' marker."""
    text = README.read_text()
    found = re.search(r"<!-- test: tests/test_workflow.py[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md lost its notebook example (marker + python block)"
    return found.group(1)


def test_the_readme_example_runs_on_a_tiny_model(model_dirs, calib_file, tmp_path, capsys):
    code = readme_example()
    assert '"smollm2-135m"' in code and "target_bpw=4.0" in code
    assert 'out="out/smol-4bpw"' in code  # replaced below: the test never writes into the checkout
    # the same call on a tiny model: its source, calibration text, a target it can reach, a short run
    code = (code.replace('"smollm2-135m"', repr(str(model_dirs["llama"])))
                .replace('"../shared/data/wikitext2_valid_tokenized.txt"', repr(str(calib_file)))
                .replace("target_bpw=4.0", "target_bpw=6.0, overrides=['group_size=32']")
                .replace("calib_samples=32, calib_len=512", "calib_samples=2, calib_len=32")
                .replace('out="out/smol-4bpw"', f"out={str(tmp_path / 'smol')!r}"))
    scope: dict = {}
    exec(compile(code, "README.md example", "exec"), scope)
    result = scope["result"]
    manifest = artifact.read_manifest(tmp_path / "smol")
    assert result.out == tmp_path / "smol"
    assert result.summary["bits_per_weight"] == pytest.approx(manifest["totals"]["bits_per_weight"])
    assert result.summary["bits_per_weight"] <= 6.0 * 1.02
    assert result.summary["allocation"]["route"] in ("planner", "pipeline")
    assert result.summary["recipe"] == manifest["recipe"]
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    assert float(printed[0].split()[0]) == pytest.approx(result.summary["bits_per_weight"])
    # progress by default, without asking: a bar per step on stderr, each ending full
    for step in ("loading", "drawing calibration windows", "planning: sensitivity", "writing the artifact"):
        assert step in captured.err, captured.err[-2000:]
    assert "1/1" in captured.err.split("writing the artifact")[-1]
    # the model returned is the one the artifact stores: same logits
    loaded, _ = hypercompress.load(tmp_path / "smol")
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(scope["model"](ids).logits, loaded(ids).logits)


def test_the_cli_summary_is_the_api_summary(model_dirs, calib_file, tmp_path):
    """The CLI only prints what the library returns: its --json equals the call's summary, timings aside."""
    cli_out, api_out, report = tmp_path / "cli", tmp_path / "api", tmp_path / "cli.json"
    assert run("compress", model_dirs["llama"], "--method", "gptq", "--set", "bits=4", "--set", "group_size=32",
               "--calib", calib_file, "--calib-samples", 2, "--calib-len", 32, "--out", cli_out,
               "--json", report).exit_code == 0
    result = hypercompress.compress(str(model_dirs["llama"]), method="gptq", overrides=["bits=4", "group_size=32"],
                                    calib=calib_file, calib_samples=2, calib_len=32, out=api_out)
    cli = json.loads(report.read_text())
    timing = {"load_seconds", "compress_seconds", "peak_memory_bytes", "peak_host_rss_bytes", "out", "stages",
              "model", "branches", "timeline", "wall_seconds"}
    assert {k: v for k, v in cli.items() if k not in timing} == \
        {k: v for k, v in json.loads(json.dumps(result.summary)).items() if k not in timing}
    assert [row["step"] for row in cli["timeline"]] == [row["step"] for row in result.summary["timeline"]]
    assert (cli_out / "model.safetensors").read_bytes() == (api_out / "model.safetensors").read_bytes()


def test_in_memory_on_a_loaded_model():
    """A loaded nn.Module is compressed in place; nothing is written; the totals are the file's it would write."""
    model = make_model("llama")
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    result = hypercompress.compress(model, Recipe.single("gptq").with_overrides(["group_size=32"]), calib)
    assert result.out is None and result.model is model
    assert any(isinstance(m, CompressedModule) for m in model.modules())
    assert result.summary["safetensors_bytes"] == artifact.stored_bytes(model)
    assert result.summary["tensor_bits"] == artifact.storage_bits(model)
    assert result.summary["branches"][-1]["bytes"] == result.summary["tensor_bits"] // 8  # tensors, no header


def test_progress_false_is_silent_and_a_callable_replaces_the_bars(model_dirs, calib_file, capsys):
    seen = []
    hypercompress.compress(str(model_dirs["llama"]), method="rtn", calib=calib_file, calib_samples=2, calib_len=32,
                           progress=lambda section, done, total: seen.append((section, done, total)))
    hypercompress.compress(str(model_dirs["llama"]), method="rtn", calib=calib_file, calib_samples=2, calib_len=32,
                           progress=False)
    assert capsys.readouterr().err == ""
    assert ("counting weights, KV cache and FLOPs", 1, 1) in seen


def test_every_step_reports_its_end_in_memory_and_on_disk(model_dirs, calib_file, tmp_path):
    """Every section a call starts it also finishes (done == total): a bar or line is never left open."""
    for out in (None, tmp_path / "a"):
        seen = []
        hypercompress.compress(str(model_dirs["llama"]), method="gptq", calib=calib_file, calib_samples=2,
                               calib_len=32, out=out, progress=lambda s, d, t, note="": seen.append((s, d, t)))
        started = {s for s, d, t in seen}
        finished = {s for s, d, t in seen if d >= t}
        assert started == finished, (out, started - finished)


def test_an_apply_recipe_step_is_exported():
    model = make_model("llama")
    report = hypercompress.apply_recipe(model, Recipe.single("rtn"))
    assert report["stages"][0]["method"] == "rtn"


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "rtn", "target_bpw": 4.0}, "plan their own recipe"),
    ({}, "give exactly one of"),
    ({"method": "gptq"}, "pass --calib"),
    ({"method": "rtn", "distill": True}, "--distill goes with"),
    ({"method": "rtn", "lossless": 30}, "zstd levels"),
    ({"method": "rtn", "device": "tpu"}, "must be cpu or cuda"),
    ({"method": "gptq", "calib": torch.zeros(4)}, "(N, L) integer tensor"),
    ({"target_bpw": 4.0, "target_ratio": 4.0}, "both given"),
])
def test_bad_calls_are_one_line_errors_before_any_work(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        hypercompress.compress(make_model("llama"), tokenizer=make_tokenizer(), **kwargs)


def test_saving_a_loaded_model_needs_its_tokenizer(tmp_path):
    with pytest.raises(UserError, match="pass tokenizer="):
        hypercompress.compress(make_model("llama"), method="rtn", out=tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_a_non_empty_out_is_refused_before_loading(tmp_path, monkeypatch):
    from hypercompress.sources import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        hypercompress.compress("smollm2-135m", method="rtn", out=tmp_path / "taken")


def test_the_summary_and_trained_stages_log_where_asked(tmp_path, monkeypatch, calib_file, model_dirs):
    """--log-dir reaches the recipe's trained stages that name none and the summary at the end."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = [{"method": "rtn", "bits": 4, "group_size": 32},
              {"method": "qat", "steps": 2, "batch": 2}]
    logs = tmp_path / "logs"
    result = hypercompress.compress(str(model_dirs["llama"]), recipe, calib_file, calib_samples=4, calib_len=16,
                                    out=tmp_path / "art", log_dir=str(logs))
    assert result.summary["logged_to"] == [str(logs)]
    assert result.summary["recipe"][1]["log_dir"] == str(logs)
    tags = set()
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert "summary/bits_per_weight" in tags and any(t.startswith("qat/") for t in tags)


def test_a_bad_tracking_destination_is_refused_before_loading(monkeypatch):
    from hypercompress.sources import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(UserError, match="W&B project name"):
        hypercompress.compress("smollm2-135m", method="rtn", wandb_project="a/b")


EMBED_RTN = {"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"^model\.embed_tokens$"]}
LINEAR_RTN = {"method": "rtn", "bits": 4, "group_size": 32}


def test_compressing_a_compressed_model_counts_against_the_original_and_keeps_its_history(model_dirs, tmp_path):
    """Two steps (an artifact compressed again, or a returned model compressed again) store and
    report what one step with both stages does: the same bytes at the same bpw, the whole recipe."""
    one = hypercompress.compress(str(model_dirs["llama"]), [EMBED_RTN, LINEAR_RTN], out=tmp_path / "one")
    first = hypercompress.compress(str(model_dirs["llama"]), [LINEAR_RTN], out=tmp_path / "first")
    second = hypercompress.compress(str(tmp_path / "first"), [EMBED_RTN], out=tmp_path / "second")
    in_memory = hypercompress.compress(make_model("llama"), [LINEAR_RTN], tokenizer=make_tokenizer())
    again = hypercompress.compress(in_memory.model, [EMBED_RTN], tokenizer=make_tokenizer(), out=tmp_path / "again")
    manifests = {name: json.loads((tmp_path / name / "hypercompress.json").read_text())
                 for name in ("one", "second", "again")}
    for name, manifest in manifests.items():
        assert manifest["original_params"] == first.summary["original_params"], name
        assert [s["method"] for s in manifest["recipe"]] == ["rtn", "rtn"], name
        assert manifest["totals"]["bits_per_weight"] == pytest.approx(one.summary["bits_per_weight"]), name
    assert second.summary["bits_per_weight"] == pytest.approx(one.summary["bits_per_weight"])
    # the branch table starts from the original, then the earlier call's model as loaded, then this call
    branches = [b["branch"] for b in second.summary["branches"]]
    assert branches[:2] == ["original (16-bit)", "earlier calls: rtn"] and branches[2].endswith("rtn")
    loaded = second.summary["branches"][1]
    assert loaded["bits_per_weight"] == pytest.approx(first.summary["branches"][-1]["bits_per_weight"])
    with pytest.raises(UserError, match="size target plans from the original model's weights.*pass the original"):
        hypercompress.compress(str(tmp_path / "first"), None, target_bpw=4.0, calib=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(UserError, match="already compressed .*compressed before"):
        hypercompress.compress(str(tmp_path / "first"), [LINEAR_RTN])


def test_a_stage_that_refuses_its_input_leaves_no_checkpoint_folder(model_dirs, tmp_path):
    """distill with nothing to train refuses in its stage, after the checkpoint folder was claimed:
    the empty folder goes too, so the same command (fixed) is not told to --resume."""
    with pytest.raises(UserError, match="distill finds nothing to train"):
        hypercompress.compress(str(model_dirs["llama"]), [{"method": "distill", "steps": 1}],
                               calib=torch.randint(1, 100, (4, 16)), out=tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoint").exists()
