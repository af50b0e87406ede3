"""Distilling from another model that shares the tokenizer (training/teacher.py): qat and distill
match a wider, deeper teacher with a padded vocabulary; bad teachers are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hypercompress.apply import _fingerprint, apply_recipe
from hypercompress.errors import UserError
from hypercompress.recipe import Recipe
from hypercompress.training.kl import chunked_kl, kl_to_teacher
from hypercompress.workflow import compress as compress_source

from conftest import WORDS, make_model, make_tokenizer, message_lines

CALIB = torch.randint(1, 121, (8, 32), generator=torch.Generator().manual_seed(0))
RTN = {"method": "rtn", "bits": 2, "group_size": 32}
QAT = {"method": "qat", "block_steps": 2, "steps": 30, "lr": 3e-3, "block_lr": 1e-3, "batch": 4,
       "teacher_fraction": 0}


def larger_teacher(rows: int = 136) -> LlamaForCausalLM:
    """Wider (96), deeper (3 blocks) and with a padded output layer (136 rows over the 121 ids)."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=rows, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def kl_to(teacher, student) -> float:
    with torch.no_grad():
        return kl_to_teacher(teacher(CALIB).logits[..., :128], student(CALIB).logits).item()


@pytest.fixture(scope="module")
def teacher():
    return larger_teacher()


@pytest.mark.parametrize("recovery", [QAT, {"method": "distill", "steps": 30, "lr": 3e-3}])
def test_the_recovery_matches_another_teacher_not_the_original(recovery, teacher):
    own, other = make_model("llama"), make_model("llama")
    apply_recipe(own, Recipe.from_list([RTN, recovery]), CALIB)
    report = apply_recipe(other, Recipe.from_list([RTN, recovery]), CALIB, distill_teacher=teacher)
    assert kl_to(teacher, other) < 0.9 * kl_to(teacher, own)
    if recovery["method"] == "qat":
        assert report["stages"][-1]["training"]["teacher"] == "another model"
        assert report["stages"][-1]["training"]["end_to_end"]["steps"] == 30


def test_chunked_kl_takes_a_teacher_of_another_width():
    generator = torch.Generator().manual_seed(0)
    h_s, w_s = torch.randn(10, 8, generator=generator, requires_grad=True), torch.randn(20, 8, generator=generator)
    h_t, w_t = torch.randn(10, 12, generator=generator), torch.randn(20, 12, generator=generator)
    chunked = chunked_kl(h_s, w_s, h_t, w_t, chunk=3)
    plain = kl_to_teacher(h_t @ w_t.T, h_s @ w_s.T)
    assert torch.allclose(chunked, plain, atol=1e-5)
    chunked.backward()
    grad = h_s.grad.clone()
    h_s.grad = None
    plain.backward()
    assert torch.allclose(grad, h_s.grad, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        chunked_kl(h_s, w_s, h_t, w_t[:19])


@pytest.mark.parametrize("recipe, needle", [
    ([RTN], "trained stages"),
    ([RTN, {"method": "hypernet", "steps": 1}], "stage 'hypernet' distils against the model's own original"),
])
def test_a_teacher_without_a_stage_that_takes_it_is_refused(recipe, needle, teacher):
    with pytest.raises(UserError, match=needle):
        apply_recipe(make_model("llama"), Recipe.from_list(recipe), CALIB, distill_teacher=teacher)


def test_the_corpus_of_a_teacher_with_more_rows_holds_only_the_students_ids(tmp_path):
    from hypercompress.training.corpus import teacher_corpus

    written = teacher_corpus(larger_teacher(rows=4096), CALIB, tokens=8 * 32, length=32, cache_dir=tmp_path, vocab=128)
    assert written.shape == (8, 32) and int(written.max()) < 128
    unlimited = teacher_corpus(larger_teacher(rows=4096), CALIB, tokens=8 * 32, length=32, cache_dir=tmp_path)
    assert int(unlimited.max()) >= 128  # a random teacher's padding rows are drawn without the limit


def test_a_teacher_with_a_non_finite_weight_is_refused():
    bad = larger_teacher()
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"teacher's tensor model\.layers\.1\.mlp\.up_proj\.weight holds inf or nan"):
        apply_recipe(make_model("llama"), Recipe.from_list([RTN, QAT]), CALIB, distill_teacher=bad)


def test_a_checkpoint_of_one_teacher_does_not_resume_with_another(teacher):
    model, recipe = make_model("llama"), Recipe.from_list([RTN, QAT])
    prints = {_fingerprint(model, recipe, CALIB), _fingerprint(model, recipe, CALIB, teacher),
              _fingerprint(model, recipe, CALIB, larger_teacher(rows=140))}
    assert len(prints) == 3


def other_tokenizer() -> PreTrainedTokenizerFast:
    """The same words under other ids."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(reversed(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[UNK]")


def test_the_python_api_loads_checks_and_records_the_teacher(tmp_path, calib_file, teacher):
    recipe = [RTN, {**QAT, "steps": 3}]
    result = compress_source(make_model("llama"), recipe, calib_file, tokenizer=make_tokenizer(),
                             teacher=teacher, teacher_tokenizer=make_tokenizer(), calib_len=32)
    assert result.summary["teacher"] == "LlamaForCausalLM"
    with pytest.raises(UserError, match="teacher's tokenizer differs from the model's"):
        compress_source(make_model("llama"), recipe, calib_file, tokenizer=make_tokenizer(), teacher=teacher,
                        teacher_tokenizer=other_tokenizer(), calib_len=32)
    with pytest.raises(UserError, match="needs both tokenizers"):
        compress_source(make_model("llama"), recipe, calib_file, tokenizer=make_tokenizer(), teacher=teacher,
                        calib_len=32)
    with pytest.raises(UserError, match="add --distill or drop --teacher"):
        compress_source(make_model("llama"), None, calib_file, tokenizer=make_tokenizer(), teacher=teacher,
                        teacher_tokenizer=make_tokenizer(), target_bpw=4.0)


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    same, other = tmp_path_factory.mktemp("teacher-same"), tmp_path_factory.mktemp("teacher-other")
    larger_teacher().save_pretrained(same)
    make_tokenizer().save_pretrained(same)
    larger_teacher().save_pretrained(other)
    other_tokenizer().save_pretrained(other)
    return same, other


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hypercompress", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_the_cli_distils_from_a_teacher_directory(tmp_path, model_dirs, calib_file, teacher_dirs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {method: rtn, bits: 2, group_size: 32}\n"
                      "  - {method: qat, block_steps: 1, steps: 2, batch: 2}\n")
    out = tmp_path / "out"
    done = run_cli("compress", model_dirs["llama"], "--recipe", recipe, "--calib", calib_file, "--calib-len", 32,
                   "--teacher", teacher_dirs[0], "--out", out, "--json", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "windows written by the teacher" in done.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["teacher"] == str(teacher_dirs[0])
    assert summary["stages"][-1]["training"]["teacher"] == "another model"


@pytest.mark.parametrize("case, needle", [
    ("other tokenizer", "teacher's tokenizer differs from the model's"),
    ("no trained stage", "trained stages (qat, distill) and this run has none"),
    ("missing teacher", "--teacher: model not found"),
])
def test_the_cli_refuses_a_bad_teacher_in_one_line_and_writes_nothing(case, needle, tmp_path, model_dirs,
                                                                       calib_file, teacher_dirs):
    recipe = tmp_path / "r.yaml"
    stages = "  - {method: rtn, bits: 2, group_size: 32}\n"
    if case != "no trained stage":
        stages += "  - {method: qat, block_steps: 1, steps: 2, batch: 2}\n"
    recipe.write_text("stages:\n" + stages)
    teacher = {"other tokenizer": teacher_dirs[1], "no trained stage": teacher_dirs[0],
               "missing teacher": tmp_path / "nowhere"}[case]
    out = tmp_path / "out"
    done = run_cli("compress", model_dirs["llama"], "--recipe", recipe, "--calib", calib_file, "--calib-len", 32,
                   "--teacher", teacher, "--out", out)
    lines = message_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()
    if case == "missing teacher":  # refused with the options, before the student is loaded
        assert "loading" not in done.stderr
