"""Source checkpoints that cannot be trusted: a missing tensor or a pickle file is refused by name."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hypercompress.errors import UserError
from hypercompress.models import load_model

from test_cli import assert_one_line_error, run


def test_missing_tensor_is_refused_by_name(model_dirs, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(source))
    result = run("compress", source, "--method", "rtn", "--out", tmp_path / "out")
    assert_one_line_error(result, "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def test_pickle_checkpoint_is_refused_without_running_it(model_dirs, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_dirs["gpt2"], source)
    os.remove(source / "model.safetensors")
    marker = tmp_path / "ran"
    torch.save({"transformer.wte.weight": _RunsCode(str(marker))}, source / "pytorch_model.bin")
    for command in ("compress", "evaluate"):
        args = (["--method", "rtn", "--out", tmp_path / "out"] if command == "compress"
                else ["--data", source / "config.json"])
        assert_one_line_error(run(command, source, *args), "pytorch_model.bin", "safetensors")
    assert not marker.exists() and not (tmp_path / "out").exists()
