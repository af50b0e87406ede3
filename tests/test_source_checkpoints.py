"""Source checkpoints that cannot be trusted: a missing tensor or a pickle file is refused by name."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hypercompress.errors import UserError
from hypercompress.sources.models import load_model

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


def test_a_wrongly_shaped_tensor_is_refused_with_both_shapes(model_dirs, tmp_path):
    """Not transformers' "look at the above report" (a report only its logging shows): the tensor,
    the file's shape and the config's, in one line."""
    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = run("compress", source, "--method", "rtn", "--out", tmp_path / "out")
    assert_one_line_error(result, "wrongly shaped tensor model.layers.0.self_attn.q_proj.weight (32x64 in the file, "
                                  "64x64 in the config)")
    assert "report" not in result.stderr and not (tmp_path / "out").exists()


def test_both_loaders_word_a_wrong_shape_alike(model_dirs, tmp_path):
    from hypercompress.sources.streaming import load_streamed

    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    messages = []
    for loader in (load_model, load_streamed):
        with pytest.raises(UserError) as caught:
            loader(str(source))
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "model.layers.0.mlp.up_proj.weight (3x64 in the file" in messages[0]


def test_a_config_claiming_a_huge_model_is_refused_before_anything_is_allocated(model_dirs, tmp_path):
    """config.json says 40,000 blocks over a 2-block checkpoint: transformers would allocate the
    whole claimed model (gigabytes) before noticing; the headers settle it first, and in little memory."""
    import json
    import subprocess
    import sys

    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 40_000
    (source / "config.json").write_text(json.dumps(config))
    # peak RSS from VmHWM (this image's own; ru_maxrss would carry the forking test process's over exec)
    script = ("import re, sys; from hypercompress.sources.models import load_model; from hypercompress.errors import "
              "UserError\ntry:\n    load_model(sys.argv[1])\nexcept UserError as e:\n    print(e)\n"
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", script, str(source)], capture_output=True, text=True, timeout=300)
    message, peak_kib = done.stdout.strip().splitlines()
    assert "config.json describes 40,000 blocks but the weight files hold 2" in message, done.stdout
    assert int(peak_kib) < 1_500_000, f"peak RSS {int(peak_kib) / 2**20:.1f} GiB: the claimed model was built"
    config["num_hidden_layers"], config["intermediate_size"] = 2, 4_000_000  # 1.5e9 parameters, same names
    (source / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-c", script, str(source)], capture_output=True, text=True, timeout=300)
    message, peak_kib = done.stdout.strip().splitlines()
    assert "parameters but the weight files hold" in message, done.stdout
    assert int(peak_kib) < 1_500_000, f"peak RSS {int(peak_kib) / 2**20:.1f} GiB: the claimed model was allocated"


def test_a_float_weight_labelled_as_integers_is_refused_by_name(model_dirs, tmp_path):
    """The header says I32 for the float embedding (same byte size, so safetensors accepts it):
    transformers would cast the integers in; the plain and the streamed loader refuse it by name."""
    import json
    import struct

    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    raw = (source / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    header["model.embed_tokens.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    (source / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + size:])
    needle = r"stores model\.embed_tokens\.weight as I32, not a float type"
    with pytest.raises(UserError, match=needle):
        load_model(str(source))
    from hypercompress.sources.streaming import load_streamed

    with pytest.raises(UserError, match=needle):
        load_streamed(str(source))
    result = run("compress", source, "--method", "rtn", "--out", tmp_path / "out")
    assert_one_line_error(result, "model.embed_tokens.weight as I32")
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


@pytest.mark.parametrize("kind", ["device", "broken link", "oversized"])
def test_a_config_json_that_is_not_a_json_file_is_named(model_dirs, tmp_path, kind):
    """Not "has no config.json" (it has one) and never a read of /dev/zero or of gigabytes."""
    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    config = source / "config.json"
    config.unlink()
    if kind == "device":
        config.symlink_to("/dev/zero")
    elif kind == "broken link":
        config.symlink_to(tmp_path / "nowhere.json")
    else:
        with open(config, "wb") as handle:
            handle.truncate(65 << 20)  # sparse: no disk used
    needle = "over the 67,108,864 a config file may hold" if kind == "oversized" else "is not a regular file"
    result = run("compress", source, "--method", "rtn", "--out", tmp_path / "out")
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_a_tokenizer_is_named_before_any_weight_is_read(model_dirs, tmp_path):
    """transformers' own error names no file and suggests re-downloading."""
    from hypercompress.sources.models import TOKENIZER_FILES

    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt"):
        (source / name).unlink(missing_ok=True)
    result = run("compress", source, "--method", "rtn", "--out", tmp_path / "out")
    assert_one_line_error(result, "has no tokenizer", "tokenizer.save_pretrained")
    assert not (tmp_path / "out").exists()
