"""inspect leads with the whole model, then groups modules stored alike across layers (natural layer
order, never layers.10 before layers.2); the size tables say which bytes they count, and the last
branch row and the file agree or the safetensors header between them is named."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.cli.module_groups import describe, group_rows, ranges
from hypercompress.cli.tables import branch_table, branch_tensor_bytes, file_note
from hypercompress.storage.inspection import natural_key, safetensors_header_bytes, sort_rows
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe

from conftest import make_tokenizer
from test_cli import run

LATE = r"layers\.1[01]\."
RECIPE = [{"method": "rtn", "bits": 4, "group_size": 32, "ignore": [LATE]},
          {"method": "rtn", "bits": 3, "group_size": 32, "targets": [LATE]}]


@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory):
    """A 12-layer tiny Llama: layers 0-9 at 4 bits, 10-11 at 3 bits (so two groups per module)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    params, recipe = count_params(model), Recipe.from_list(RECIPE)
    apply_recipe(model, recipe, torch.randint(1, 121, (2, 16), generator=torch.Generator().manual_seed(0)), batch_size=2)
    artifact.round_to_storage(model)
    return artifact.save(model, make_tokenizer(), tmp_path_factory.mktemp("twelve") / "art",
                         recipe=recipe.to_list(), original_params=params)


def module_lines(output):
    return [line for line in output.splitlines() if "model." in line or "lm_head" in line]


def test_the_whole_model_comes_first_and_modules_are_grouped(twelve_layers, tmp_path):
    shown = run("inspect", twelve_layers, "--json", tmp_path / "i.json")
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    size = json.loads((twelve_layers / artifact.MANIFEST).read_text())["totals"]["safetensors_bytes"]
    assert out.index(f"model.safetensors {size:,} B") < out.index("per module")
    assert "recipe: rtn bits=4" in out and "-> rtn bits=3" in out
    lines = module_lines(out)
    q = [line for line in lines if "q_proj" in line]
    assert len(q) == 2 and "model.layers.{0-9}.self_attn.q_proj" in q[0] and "quant 4-bit g32" in q[0]
    assert "×10" in q[0] and "model.layers.{10-11}.self_attn.q_proj" in q[1] and "quant 3-bit g32" in q[1]
    order = [re.search(r"\.(\w+_proj)", line).group(1) for line in lines if "_proj" in line][:7]
    assert order == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # model order
    assert "dense tensors (--all lists them)" in out
    modules = json.loads((tmp_path / "i.json").read_text())["modules"]  # every module, one row each
    names = [m["name"] for m in modules]
    assert len([n for n in names if n.endswith("q_proj")]) == 12
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layers == sorted(layers) and names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_all_lists_every_row_in_numeric_layer_order(twelve_layers):
    shown = run("inspect", twelve_layers, "--all")
    assert shown.exit_code == 0, shown.output
    q = [re.search(r"model\.layers\.(\d+)\.self_attn\.q_proj", line) for line in shown.stdout.splitlines()]
    assert [int(m.group(1)) for m in q if m] == list(range(12))
    assert "dense tensors (--all" not in shown.stdout and "input_layernorm.weight" in shown.stdout


def test_the_tables_name_what_their_bytes_count(twelve_layers):
    shown = run("inspect", twelve_layers)
    weights = twelve_layers / artifact.WEIGHTS
    size, header = weights.stat().st_size, safetensors_header_bytes(weights)
    tensors = sum(t.numel() * t.element_size() for t in artifact._read_tensors(weights).values())
    assert tensors + header == size
    assert f"model.safetensors {size:,} B (the file, header included)" in shown.stdout  # the headline
    assert f"= {tensors:,} B; model.safetensors adds its {header:,} B safetensors header" in shown.stdout


def test_the_branch_note_ties_the_last_row_to_the_file(model_dirs, text_file, tmp_path):
    out = tmp_path / "art"
    result = run("compress", model_dirs["llama"], "--method", "rtn", "--set", "bits=4", "--out", out)
    assert result.exit_code == 0, result.output
    shown = run("inspect", out)
    last = json.loads((out / "summary.json").read_text())["branches"][-1]
    size = (out / artifact.WEIGHTS).stat().st_size
    header = safetensors_header_bytes(out / artifact.WEIGHTS)
    assert last["bytes"] + header == size  # the branch counts tensors, the file adds its header
    assert "tensor bytes" in shown.stdout
    assert f"model.safetensors {size:,} B = {last['bytes']:,} tensor bytes + {header:,} B" in shown.stdout
    assert "counts" not in shown.stdout.split("tensor bytes: stored tensors only")[1].splitlines()[0]


def test_a_lossless_row_is_shown_as_its_tensor_bytes():
    rows = [{"branch": "original (16-bit)", "weights": 100, "bytes": 200},
            {"branch": "0: rtn", "weights": 100, "bytes": 60},
            {"branch": "lossless (zstd 3)", "weights": 100, "bytes": 58}]  # the coded file, header included
    assert [branch_tensor_bytes(r, 58, 8) for r in rows] == [200, 60, 50]
    assert branch_tensor_bytes(rows[2], 99, 8) == 58  # not the file: as stored
    table = branch_table(rows, 100, "t", 58, 8, seconds={"0: rtn": "1.5"})
    assert [c.header for c in table.columns][2] == "tensor bytes" and table.columns[-1].header == "seconds"
    assert list(table.columns[2].cells) == ["200", "60", "50"]
    assert "= 50 tensor bytes + 8 B safetensors header" in file_note(58, 8, 100, 50)
    assert "(the last branch counts 60 tensor bytes)" in file_note(58, 8, 100, 60)


def test_groups_and_sorting_without_a_model():
    rows = [{"name": f"model.layers.{i}.mlp.up_proj", "kind": "quant", "params": 10, "bits": 40,
             "layout": {"in_features": 2, "out_features": 5, "bits": 3 if i == 14 else 4, "group_size": 64,
                        "symmetric": False, "bias": False}} for i in (10, 2, 0, 1, 14, 11)]
    rows.append({"name": "model.layers.3.mlp.up_proj", "kind": "sparse", "params": 10, "bits": 20,
                 "layout": {"in_features": 2, "out_features": 5, "nnz": 5, "bits": 16, "group_size": 0,
                            "symmetric": False, "bias": False}})
    ordered = sort_rows(rows, {})
    assert [r["name"].split(".")[2] for r in ordered] == ["0", "1", "2", "3", "10", "11", "14"]
    groups = group_rows(ordered)
    assert [(g.name, g.storage, len(g.names)) for g in groups] == [
        ("model.layers.{0-2,10-11}.mlp.up_proj", "quant 4-bit g64", 5),
        ("model.layers.3.mlp.up_proj", "sparse fp16 50% kept", 1),
        ("model.layers.14.mlp.up_proj", "quant 3-bit g64", 1)]
    assert groups[0].params == 50 and groups[0].bits_per_weight == 4.0
    assert ranges([5, 1, 2, 3, 9]) == "1-3,5,9" and natural_key("a.10") > natural_key("a.9")
    assert describe("lora", {"rank": 8, "base": {"kind": "quant", "layout": {"bits": 4, "group_size": 32}}}) == \
        "lora rank 8 on quant 4-bit g32"
    per_layer = [{"name": f"m.layers.{i}.q", "kind": "generated_linear", "params": 1, "bits": 1,
                  "layout": {"layer": i, "type": 0, "base": None}} for i in range(3)]
    assert len(group_rows(per_layer)) == 1  # the layer index a layout restates does not split a group
