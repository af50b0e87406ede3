"""Checkpoint files are untrusted input: a torn, truncated, forged or edited checkpoint is a one-line
UserError naming the fix, the folder is kept, and nothing is allocated on a header's word."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from hypercompress.storage import checkpoint as checkpoint_module
from hypercompress.apply import apply_recipe
from hypercompress.storage.checkpoint import describe_leftover
from hypercompress.errors import UserError
from hypercompress.sources.models import load_model
from hypercompress.recipe import Recipe

RECIPE = [{"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"^transformer\.wte$"]},
          {"method": "gptq", "bits": 4, "group_size": 32}]


class Killed(BaseException):
    pass


def calib():
    return torch.randint(1, 121, (4, 16), generator=torch.Generator().manual_seed(0))


def killed_after_first_block(monkeypatch, start) -> None:
    """Run start() with the checkpoint writer dying at its 6th write: run.json, stages.json (the
    finished rtn pass's row), block 0 (its new modules, the hidden states, state), then before block
    1's files."""
    real, calls = checkpoint_module.replace_file, []

    def replace_file(path, write):
        calls.append(path)
        if len(calls) == 6:
            raise Killed
        real(path, write)

    monkeypatch.setattr(checkpoint_module, "replace_file", replace_file)
    with pytest.raises(Killed):
        start()
    monkeypatch.setattr(checkpoint_module, "replace_file", real)


def run(model_dir, folder, resume=False):
    apply_recipe(load_model(str(model_dir)).model, Recipe.from_list(RECIPE), calib(), batch_size=2,
             checkpoint_dir=folder, resume=resume)


@pytest.fixture
def folder(model_dirs, tmp_path, monkeypatch):
    """A checkpoint folder of a run killed after its second block checkpoint (tied gpt2)."""
    killed_after_first_block(monkeypatch, lambda: run(model_dirs["gpt2"], tmp_path / "run.checkpoint"))
    return tmp_path / "run.checkpoint"


def state(folder):
    return json.loads((folder / "state.json").read_text())


def tensors_file(folder):
    return folder / state(folder)["file"]


def forged_header(header: dict, data: bytes = b"\0" * 16) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def set_state(folder, **changes):
    (folder / "state.json").write_text(json.dumps({**state(folder), **changes}))


def legacy_torn(folder):
    """The torn state older versions left: state.json (no file entry), its tensors deleted."""
    old = {k: v for k, v in state(folder).items() if k not in ("file", "bytes", "format")}
    tensors_file(folder).unlink()
    (folder / "state.json").write_text(json.dumps(old))


def edit_layout(folder):
    entry = state(folder)["modules"]["transformer.wte"]
    entry["layout"] = {**entry["layout"], "in_features": 2**40}
    set_state(folder, modules={**state(folder)["modules"], "transformer.wte": entry})


def other_hidden_shape(folder):
    tensors = load_file(str(tensors_file(folder)))
    tensors["hidden.0"] = tensors["hidden.0"][:, :8].contiguous()
    save_file(tensors, str(tensors_file(folder)))
    set_state(folder, bytes=tensors_file(folder).stat().st_size, sha256=hashlib.sha256(tensors_file(folder).read_bytes()).hexdigest())


def flip_bytes(file, count=1000):
    """Flip `count` bytes in the middle of the tensor data (the header and the size unchanged)."""
    data = bytearray(file.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    middle = start + (len(data) - start - count) // 2
    assert middle >= start and len(data) - start >= count
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    file.write_bytes(bytes(data))


def earlier_version(folder):
    """A checkpoint as the previous version wrote it: format 1, no digest recorded."""
    old = {k: v for k, v in state(folder).items() if k != "sha256"}
    (folder / "state.json").write_text(json.dumps({**old, "format": 1}))


CORRUPTIONS = {
    "tensors file missing (torn)": (lambda f: tensors_file(f).unlink(), "is missing"),
    "legacy torn checkpoint": (legacy_torn, "is missing"),
    "truncated": (lambda f: tensors_file(f).write_bytes(tensors_file(f).read_bytes()[:-100]), "bytes, not"),
    "garbage": (lambda f: (tensors_file(f).write_bytes(b"x" * 1000), set_state(f, bytes=1000)),
                "not a valid safetensors"),
    "header claims 4 TiB": (lambda f: (tensors_file(f).write_bytes(forged_header(
        {"hidden.0": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}})),
        set_state(f, bytes=tensors_file(f).stat().st_size)), "not a valid safetensors"),
    "state.json not JSON": (lambda f: (f / "state.json").write_text('{"stage": 1, "blo'), "unreadable"),
    "state.json a list": (lambda f: (f / "state.json").write_text("[1, 2]"), "not a JSON object"),
    "stage of no pass": (lambda f: set_state(f, stage=0), "not a calibrated pass"),
    "block past the model": (lambda f: set_state(f, block=7), "block 7"),
    "file outside the folder": (lambda f: set_state(f, file="../run.safetensors"), "valid block, modules or file"),
    "unknown module kind": (lambda f: set_state(f, modules={"transformer.wte": {"kind": "pickle", "layout": {}}}),
                            "no known kind"),
    "layout claims 2**40 columns": (edit_layout, "in_features = 1099511627776 is out of range"),
    "hidden states of another shape": (other_hidden_shape, "hidden states do not match"),
    "1000 bytes flipped in the tensors": (lambda f: flip_bytes(tensors_file(f)), "does not match the sha256"),
    "digest edited": (lambda f: set_state(f, sha256="0" * 64), "does not match the sha256"),
    "written by an earlier version": (earlier_version, "records no sha256"),
    "stage rows of another shape": (lambda f: (f / "stages.json").write_text(
        json.dumps({"fingerprint": state(f)["fingerprint"], "rows": {"0": {"stage": 5}}})), "stage rows"),
    "stage rows not JSON": (lambda f: (f / "stages.json").write_text('{"rows": '), "unreadable"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_an_unreadable_checkpoint_is_one_error_that_names_the_fix_and_is_kept(case, folder, model_dirs):
    corrupt, needle = CORRUPTIONS[case]
    corrupt(folder)
    with pytest.raises(UserError, match=needle) as error:
        run(model_dirs["gpt2"], folder, resume=True)
    assert f"rm -r '{folder}'" in str(error.value) and "\n" not in str(error.value)
    assert folder.is_dir()  # a failed resume never deletes the checkpoint


def test_a_torn_checkpoint_blocks_no_fresh_run(folder, model_dirs):
    """The refusal of a fresh run says how to get out: remove the folder; then the run succeeds."""
    assert "pass --resume to continue it" in describe_leftover(folder)
    tensors_file(folder).unlink()
    message = describe_leftover(folder)
    assert "cannot be resumed" in message and f"rm -r '{folder}'" in message
    run(model_dirs["gpt2"], folder)  # the library's fresh run (resume=False) starts the folder afresh
    assert not folder.exists()


@pytest.mark.parametrize("damage", ["garbage", "another shape", "1000 bytes flipped", "earlier version"])
def test_an_unreadable_distillation_checkpoint_is_one_error(damage, model_dirs, tmp_path, monkeypatch):
    import functools

    from hypercompress.training.distill import DistillSettings
    from hypercompress.methods import distill_factors

    monkeypatch.setattr(distill_factors, "DistillSettings", functools.partial(DistillSettings, checkpoint_every=2))
    stages = Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 32},
                               {"method": "distill", "steps": 4, "batch": 2}])
    real, calls = checkpoint_module.replace_file, []

    def replace_file(path, write):
        calls.append(path)
        if len(calls) == 5:  # run.json, stages.json (rtn's row), distill step 2 (tensors, state), then before step 4
            raise Killed
        real(path, write)

    folder = tmp_path / "run.checkpoint"
    monkeypatch.setattr(checkpoint_module, "replace_file", replace_file)
    with pytest.raises(Killed):
        apply_recipe(load_model(str(model_dirs["llama"])).model, stages, calib(), checkpoint_dir=folder)
    monkeypatch.setattr(checkpoint_module, "replace_file", real)
    distill = folder / "stage1" / "distill"
    saved = distill / json.loads((distill / "state.json").read_text())["file"]
    if damage == "garbage":
        saved.write_bytes(b"\x08" + b"\0" * 7 + b"{}" + b"x" * 50)
    elif damage == "another shape":
        tensors = load_file(str(saved))
        name = next(k for k in tensors if k.startswith("param."))
        tensors[name] = torch.zeros(3)
        save_file(tensors, str(saved), metadata={"step": "2"})
    elif damage == "1000 bytes flipped":
        flip_bytes(saved)
    else:  # the single distill.safetensors earlier versions wrote, with no digest anywhere
        saved.rename(saved.with_name("distill.safetensors"))
        (distill / "state.json").unlink()
        saved = saved.with_name("distill.safetensors")
    needle = {"1000 bytes flipped": "does not match the sha256", "earlier version": "records no sha256"}
    with pytest.raises(UserError, match="rm -r") as error:
        apply_recipe(load_model(str(model_dirs["llama"])).model, stages, calib(), checkpoint_dir=folder, resume=True)
    assert "\n" not in str(error.value) and saved.is_file()
    assert needle.get(damage, "cannot be resumed") in str(error.value)


def test_a_fifo_in_place_of_a_checkpoint_file_does_not_hang(folder, model_dirs):
    import os

    tensors_file(folder).unlink()
    os.mkfifo(tensors_file(folder))
    with pytest.raises(UserError, match="is missing"):
        run(model_dirs["gpt2"], folder, resume=True)
    (folder / "state.json").unlink()
    os.mkfifo(folder / "state.json")
    with pytest.raises(UserError, match="not a regular file"):
        run(model_dirs["gpt2"], folder, resume=True)


@pytest.mark.parametrize("resume", [False, True])
def test_a_file_where_the_checkpoint_folder_goes_is_refused_and_kept(resume, model_dirs, tmp_path):
    (tmp_path / "run.checkpoint").write_text("mine")
    with pytest.raises(UserError, match="in the way"):
        run(model_dirs["gpt2"], tmp_path / "run.checkpoint", resume=resume)
    assert (tmp_path / "run.checkpoint").read_text() == "mine"


def test_a_resume_of_flipped_tensor_bytes_is_refused_by_the_cli_and_the_folder_kept(model_dirs, text_file,
                                                                                     tmp_path, monkeypatch):
    """Before: the resume exited 0 with an artifact other than an uninterrupted run's."""
    from test_cli import assert_one_line_error, run as cli

    args = ["compress", model_dirs["gpt2"], "--method", "gptq", "--set", "bits=4", "--set", "group_size=32",
            "--calib", text_file, "--calib-samples", 4, "--calib-len", 16, "--out", tmp_path / "x"]
    killed_after_first_block(monkeypatch, lambda: cli(*args))
    folder = tmp_path / "x.checkpoint"
    flip_bytes(tensors_file(folder))
    assert_one_line_error(cli(*args, "--resume"), "cannot be resumed", "sha256", f"rm -r '{folder}'")
    assert tensors_file(folder).is_file() and not (tmp_path / "x").exists()


def test_a_pass_writes_each_module_once(model_dirs, tmp_path, monkeypatch):
    """Incremental checkpoints: each block's save writes only the modules new since the pass's last
    save (a 7B pass writes its size once, not size x blocks / 2), and state.json lists every part."""
    written = []
    real = checkpoint_module.save_tensors

    def recording(path, tensors, metadata=None):
        written.append((path.name, sorted(tensors)))
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_module, "save_tensors", recording)
    folder = tmp_path / "run.checkpoint"
    apply_recipe(load_model(str(model_dirs["gpt2"])).model, Recipe.from_list(RECIPE), calib(), batch_size=2,
             checkpoint_dir=folder, keep_checkpoint=True)
    module_writes = [name for file, names in written if file.startswith("modules-") for name in names]
    assert len(module_writes) == len(set(module_writes)) > 0
    assert any(n.startswith("module.transformer.h.1.") for n in module_writes)
    saved = state(folder)
    assert len(saved["parts"]) == 2 and all((folder / p["file"]).is_file() for p in saved["parts"])
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(
        [saved["file"]] + [p["file"] for p in saved["parts"]])  # the superseded hidden states removed
