"""--stream-blocks: the original's blocks are read from its safetensors shards one at a time, the
result is byte-identical to a run on the model loaded whole, and hostile shard files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hypercompress
from hypercompress.sources import streaming
from hypercompress.errors import UserError
from hypercompress.layers.base import CompressedModule

from conftest import make_model, make_tokenizer
from test_cli import assert_one_line_error, run


def sharded_dir(path: Path, arch: str = "llama", layers: int = 3) -> Path:
    """A tiny model saved as several safetensors shards with an index (as 7B checkpoints are)."""
    model = make_model(arch)
    if layers != 2:
        torch.manual_seed(0)
        config = model.config
        config.num_hidden_layers = layers
        model = type(model)(config).eval()
    model.save_pretrained(path, max_shard_size="60KB")
    make_tokenizer().save_pretrained(path)
    assert (path / streaming.INDEX).is_file()
    return path


def block_linears_in_ram(model: nn.Module) -> list[int]:
    """For each block: how many of its dense nn.Linear weights are in memory (not on meta)."""
    counts = []
    for block in model.model.layers:
        counts.append(sum(1 for m in block.modules() if isinstance(m, nn.Linear)
                          and not isinstance(m, CompressedModule) and m.weight.device.type != "meta"))
    return counts


@pytest.mark.parametrize("recipe", [["gptq", "bits=4", "group_size=32"], ["rtn", "bits=4", "group_size=32"]])
def test_streamed_is_byte_identical_to_loaded_whole(tmp_path, calib_file, recipe):
    source = sharded_dir(tmp_path / "src")
    method, overrides = recipe[0], recipe[1:]
    kwargs = dict(method=method, overrides=overrides, calib=calib_file, calib_samples=2, calib_len=32)
    whole = hypercompress.compress(str(source), out=tmp_path / "whole", **kwargs)
    streamed = hypercompress.compress(str(source), out=tmp_path / "streamed", stream_blocks=True, **kwargs)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert streamed.summary["streamed"] and not whole.summary["streamed"]
    assert streamed.summary["kv_cache_bytes_per_token"] == whole.summary["kv_cache_bytes_per_token"]
    if method == "gptq":
        assert len(streamed.summary["stages"][0]["block_seconds"]) == 3


def test_one_dense_block_at_a_time(tmp_path, calib_file, monkeypatch):
    """When block i is read, every earlier block's linears are already compressed (not dense in RAM)
    and no later block has been read."""
    source = sharded_dir(tmp_path / "src", layers=4)
    seen = []
    original_load = streaming.LazyWeights.load

    def spying_load(self, model, names):
        blocks = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        if blocks:
            seen.append((sorted(blocks), block_linears_in_ram(model)))
        original_load(self, model, names)

    monkeypatch.setattr(streaming.LazyWeights, "load", spying_load)
    hypercompress.compress(str(source), method="gptq", overrides=["group_size=32"], calib=calib_file,
                           calib_samples=2, calib_len=32, stream_blocks=True)
    assert [blocks for blocks, _ in seen] == [[0], [1], [2], [3]]
    for blocks, in_ram in seen:
        assert sum(in_ram) == 0, f"reading block {blocks}: dense linears already in RAM {in_ram}"


def test_the_skeleton_holds_no_block_weight(tmp_path):
    model, _ = streaming.load_streamed(str(sharded_dir(tmp_path / "src")))
    assert block_linears_in_ram(model) == [0, 0, 0]
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.lm_head.weight.device.type == "cpu"
    assert streaming.is_streamed(model)
    streaming.materialize_all(model)
    assert not streaming.is_streamed(model)
    stored = {}
    for shard in (tmp_path / "src").glob("*.safetensors"):
        stored.update(load_file(shard))
    state = model.state_dict()
    assert set(stored) == set(state)
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor.float()), name


def test_a_tied_model_streams(tmp_path, calib_file):
    source = sharded_dir(tmp_path / "gpt2", arch="gpt2", layers=2)
    whole = hypercompress.compress(str(source), method="rtn", out=tmp_path / "a")
    streamed = hypercompress.compress(str(source), method="rtn", out=tmp_path / "b", stream_blocks=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert whole.summary["bits_per_weight"] == streamed.summary["bits_per_weight"]


def _first_block_shard(source: Path) -> Path:
    index = json.loads((source / streaming.INDEX).read_text())["weight_map"]
    return source / index["model.layers.0.self_attn.q_proj.weight"]


def _rewrite(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda s: _rewrite(_first_block_shard(s), lambda t: t.pop("model.layers.0.self_attn.q_proj.weight")),
     "does not hold model.layers.0.self_attn.q_proj.weight"),
    (lambda s: _rewrite(_first_block_shard(s), lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})), "wrongly shaped tensor"),
    (lambda s: (s / streaming.INDEX).write_text(json.dumps({"weight_map": {"model.norm.weight": "../x.safetensors"}})),
     "not a .safetensors file in"),
    (lambda s: (s / streaming.INDEX).write_text("{not json"), "no valid weight_map"),
    (lambda s: _first_block_shard(s).write_bytes(b"\x00" * 64), "not a readable safetensors file"),
    (lambda s: _first_block_shard(s).unlink(), "is missing from"),
    (lambda s: _rewrite(_first_block_shard(s), lambda t: t["model.layers.0.self_attn.q_proj.weight"].fill_(float("nan"))),
     "holds inf or nan"),
])
def test_hostile_shards_are_one_line_errors(tmp_path, calib_file, damage, message):
    source = sharded_dir(tmp_path / "src")
    damage(source)
    out = tmp_path / "out"
    result = run("compress", source, "--method", "gptq", "--set", "group_size=32", "--calib", calib_file,
                 "--calib-samples", 2, "--calib-len", 32, "--stream-blocks", "--out", out)
    assert_one_line_error(result, message)
    assert not out.exists()


def test_bad_stream_requests_are_refused(tmp_path, model_dirs, calib_file, text_file):
    gguf_like = tmp_path / "model.gguf"
    gguf_like.write_bytes(b"GGUF")
    assert_one_line_error(run("compress", gguf_like, "--method", "rtn", "--stream-blocks", "--out", tmp_path / "o"),
                          "reads a local Hugging Face model directory")
    assert_one_line_error(run("compress", model_dirs["llama"], "--method", "rtn", "--stream-blocks", "--eval",
                              text_file, "--out", tmp_path / "o"), "drop --eval")
    with pytest.raises(UserError, match="pass its path"):
        hypercompress.compress(make_model("llama"), method="rtn", stream_blocks=True)
    assert not (tmp_path / "o").exists()


def test_a_killed_streamed_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """A streamed pass killed after a block resumes from its checkpoint (the finished blocks'
    modules restored, their norms read at the end) to the model an uninterrupted run gives."""
    from hypercompress.storage import artifact
    from hypercompress.apply import apply_recipe
    from hypercompress.recipe import Recipe

    from test_checkpoint_files import killed_after_first_block

    source = str(sharded_dir(tmp_path / "src"))
    recipe = Recipe.from_list([{"method": "gptq", "bits": 4, "group_size": 32}])
    calib = torch.randint(1, 121, (4, 16), generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "run.checkpoint"

    def start(resume=False):
        model, tokenizer = streaming.load_streamed(source)
        apply_recipe(model, recipe, calib, batch_size=2, checkpoint_dir=folder, resume=resume)
        return model, tokenizer

    killed_after_first_block(monkeypatch, start)
    assert folder.is_dir()
    resumed, tokenizer = start(resume=True)
    whole, _ = streaming.load_streamed(source)
    apply_recipe(whole, recipe, calib, batch_size=2)
    for model, name in ((resumed, "resumed"), (whole, "whole")):
        artifact.save(model, tokenizer, tmp_path / name, recipe=recipe.to_list(), original_params=1)
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_a_tied_model_streams_after_its_embedding_is_compressed(tmp_path, calib_file):
    """An embedding stage before the layer-wise pass (SmolLM2's embed4 recipe): reading the blocks
    afterwards must not re-tie the replaced embedding."""
    source = sharded_dir(tmp_path / "gpt2", arch="gpt2", layers=2)
    recipe = [{"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"^transformer\.wte$"]},
              {"method": "gptq", "bits": 4, "group_size": 32}]
    kwargs = dict(calib=calib_file, calib_samples=2, calib_len=32)
    hypercompress.compress(str(source), recipe, out=tmp_path / "a", **kwargs)
    hypercompress.compress(str(source), recipe, out=tmp_path / "b", stream_blocks=True, **kwargs)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
