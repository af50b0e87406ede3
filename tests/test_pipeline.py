"""The hybrid pipeline: plans fit their target exactly as stored, remove blocks when factors alone
cannot fit, refuse what no pipeline reaches; the CLI writes a per-branch summary and a plot."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.errors import UserError
from hypercompress.modules import count_params
from hypercompress.planning.hybrid import SATURATED_KL, embedding_rank_key, fit_pipeline, plan_pipeline
from hypercompress.recipe import Recipe

from conftest import make_model, tied_llama
from test_cli import assert_one_line_error, run

CALIB = torch.randint(1, 121, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch, target", [("llama", 6.0), ("llama", 3.0), ("gpt2", 4.0)])
def test_low_rank_plan_is_exact_and_under_target(arch, target):
    plan = plan_pipeline(make_model(arch), target)
    assert [s["method"] for s in plan.stages][-1] == "asvd" and plan.planned_bpw <= target
    model = make_model(arch)
    apply_recipe(model, Recipe.from_list(plan.stages), CALIB)
    assert artifact.storage_bits(model) == plan.planned_bits


def test_blocks_are_removed_when_rank_one_does_not_fit():
    plan = plan_pipeline(make_model("llama"), 1.9)
    assert plan.stages[0] == {"method": "structured", "drop_layers": 1, "mlp_keep": 1.0}
    model = make_model("llama")
    apply_recipe(model, Recipe.from_list(plan.stages), CALIB)
    assert len(model.model.layers) == 1 and artifact.storage_bits(model) <= plan.planned_bits


def test_embedding_option_is_the_lowest_measured_kl_within_its_share():
    measured = {}
    stage = plan_pipeline(make_model("llama"), 6.0, calib=CALIB, measured=measured).stages[0]
    chosen = ("rtn", stage["bits"]) if stage["method"] == "rtn" else ("factor", stage["rank"], stage["bits"])
    keys = {option: embedding_rank_key(score) for option, score in measured.items()}
    assert len(keys) > 1 and keys[chosen] == min(keys.values())


def test_saturated_embedding_options_are_ranked_by_table_error():
    assert embedding_rank_key((0.3, 0.5)) < embedding_rank_key((SATURATED_KL + 5, 0.1)) \
        < embedding_rank_key((SATURATED_KL + 1, 0.2))


def test_unreachable_target_names_the_smallest_ratio():
    with pytest.raises(UserError, match=r"beyond reach.*\(9\.3x\); ask for at most"):
        plan_pipeline(make_model("llama"), 1.0)


def test_fit_counts_the_file_with_its_lossless_stage():
    model = make_model("llama")
    plan = fit_pipeline(model, 2.93, CALIB, lossless=10)  # 3.0 lies between plans (one rank step: 0.18 bpw)
    trial = make_model("llama")
    apply_recipe(trial, Recipe.from_list(plan.stages), CALIB)
    assert plan.reached_bpw == artifact.stored_bytes(trial, 10) * 8 / count_params(model)
    assert 2.93 * 0.98 <= plan.reached_bpw <= 2.93


def test_distill_after_block_removal_matches_the_final_hidden_state():
    model = make_model("llama")
    plan = plan_pipeline(make_model("llama"), 1.9, distill_steps=2)
    assert plan.stages[-1]["method"] == "distill"
    apply_recipe(model, Recipe.from_list(plan.stages), CALIB)
    assert torch.isfinite(model(CALIB).logits).all()


@pytest.fixture(scope="module")
def pipeline_artifact(model_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "llama-x8"
    result = run("compress", model_dirs["llama"], "--target-ratio", 8, "--calib", text_file,
                 "--calib-samples", 4, "--calib-len", 32, "--eval", text_file, "--eval-windows", 2,
                 "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_cli_target_ratio_writes_summary_and_reaches_the_ratio(pipeline_artifact):
    manifest = json.loads((pipeline_artifact / artifact.MANIFEST).read_text())
    assert manifest["lossless"]["level"] == 10
    assert 16 / manifest["totals"]["bits_per_weight"] >= 8 / 1.02
    summary = json.loads((pipeline_artifact / "summary.json").read_text())
    branches = summary["branches"]
    assert branches[0]["branch"] == "original (16-bit)" and branches[0]["ratio_vs_16bit"] == 1
    assert branches[-1]["branch"].startswith("lossless")
    assert branches[-1]["bytes"] == (pipeline_artifact / artifact.WEIGHTS).stat().st_size
    assert all(b["ppl"] > 1 and b["kl"] is not None for b in branches)
    assert branches[0]["kl"] == pytest.approx(0, abs=1e-6)
    modules = summary["modules"]  # per module: before / after; this plan removed a block
    assert {m["module"] for m in modules} >= {"model.embed_tokens", "model.layers.0.mlp.up_proj"}
    assert any(m["kind"].startswith("removed") and m["weights_after"] == m["bytes"] == 0 for m in modules)
    stored = sum(m["bytes"] for m in modules)  # all but the norms
    assert 0.9 * branches[-2]["bytes"] < stored <= branches[-2]["bytes"]
    flops = summary["flops_per_token"]  # low-rank factors of rank r cost r (in + out) per matmul
    assert 0 < flops["after"] < flops["before"] / 2
    assert "| branch |" in (pipeline_artifact / "summary.md").read_text()
    assert "| module | kind | weights before |" in (pipeline_artifact / "summary.md").read_text()
    assert "summary.json" in manifest["files"]


def test_inspect_shows_branches_and_plot_draws_them(pipeline_artifact, tmp_path):
    result = run("inspect", pipeline_artifact, "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    assert "per branch" in result.output and "lossless stage" in result.output
    assert json.loads((tmp_path / "i.json").read_text())["branches"]
    result = run("plot", pipeline_artifact.parent, "--out", tmp_path / "rd.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ratio", [2, 3])
def test_the_planner_route_is_fitted_to_the_stored_file(ratio, model_dirs, text_file, tmp_path):
    result = run("compress", model_dirs["llama"], "--target-ratio", ratio, "--calib", text_file,
                 "--calib-samples", 2, "--calib-len", 32, "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    bpw = json.loads((tmp_path / "x" / artifact.MANIFEST).read_text())["totals"]["bits_per_weight"]
    assert abs(bpw / (16 / ratio) - 1) <= 0.02  # header and zstd stage counted (tiny: the header is large)


def test_distill_above_the_floor_appends_qat(model_dirs, text_file, tmp_path):
    result = run("compress", model_dirs["llama"], "--target-ratio", 2, "--distill", "--distill-steps", 2,
                 "--set", "qat.teacher_fraction=0", "--set", "qat.block_steps=1",
                 "--calib", text_file, "--calib-samples", 2, "--calib-len", 32, "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "x" / artifact.MANIFEST).read_text())["recipe"]
    assert recipe[0]["method"] != "asvd" and recipe[-1]["method"] == "qat"  # the planner's route, trained
    assert recipe[-1]["teacher_fraction"] == 0 and recipe[-1]["block_steps"] == 1  # --set on the recovery stage


@pytest.mark.parametrize("args, needles", [
    (["--target-ratio", 1000], ["beyond reach", "--target-ratio of at most"]),
    (["--method", "rtn", "--distill"], ["--distill goes with"]),
    (["--method", "rtn", "--lossless", 30], ["zstd levels"]),
    (["--target-ratio", 2, "--set", "qat.corpus_tokens=5"], ["qat.corpus_tokens=5", "add --distill"]),
    (["--target-ratio", 2, "--distill", "--set", "qat.no_such_key=1"], ["no stage has key 'no_such_key'"]),
    (["--target-ratio", 2, "--distill", "--set", "qat.corpus_tokens=many"], ["corpus_tokens: expected int"]),
    (["--target-ratio", 2, "--distill", "--set", "qat.bits=2"], ["the plan decides", "qat.corpus_tokens"]),
    (["--target-ratio", 2, "--set", "lr=1"], ["only group_size=G", "qat.KEY=VALUE"]),
])
def test_bad_pipeline_requests(args, needles, model_dirs, text_file, tmp_path):
    result = run("compress", model_dirs["llama"], *args, "--calib", text_file, "--calib-samples", 2,
                 "--calib-len", 32, "--out", tmp_path / "x")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "x").exists()


def test_plot_of_a_folder_without_results_is_refused(tmp_path):
    assert_one_line_error(run("plot", tmp_path, "--out", tmp_path / "rd.png"), "no results")


def big_vocab_model() -> torch.nn.Module:
    """An embedding (49152 x 64, tied) that dwarfs its two blocks, as tiny test models built from a
    real tokenizer have: the blocks' factors reach their break-even rank (21 for the 32x64 k_proj)
    long before the budget runs out."""
    return tied_llama(49152)


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    from conftest import make_tokenizer

    path = tmp_path_factory.mktemp("big-vocab")
    big_vocab_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_no_plan_has_a_rank_past_the_break_even_rank():
    """Before: 0.5 bpw planned asvd rank 25 here, and compress refused the tool's own plan with
    'set rank to 1..21'."""
    from hypercompress.arch import block_linear_names
    from hypercompress.methods.svd import max_useful_rank
    from hypercompress.layers.base import linear_weight
    from hypercompress.planning.hybrid import BeyondReach

    model = big_vocab_model()
    cap = min(max_useful_rank(*linear_weight(model.get_submodule(n)).shape) for n in block_linear_names(model))
    assert cap == 21
    planned = 0
    for target in [0.05 * i for i in range(1, 46)]:  # up to 2.25 bpw, the quantization floor is 2.28
        try:
            plan = plan_pipeline(model, target)
        except BeyondReach:
            continue
        planned += 1
        ranks = [s["rank"] for s in plan.stages if s["method"] == "asvd"]
        assert ranks and max(ranks) <= cap, (target, plan.stages)
        assert plan.planned_bpw <= target
    assert planned > 30
    plan = plan_pipeline(model, 0.5)
    assert not any(s["method"] == "structured" for s in plan.stages)  # every block kept, at rank 21
    apply_recipe(model, Recipe.from_list(plan.stages), CALIB)  # the recipe checks accept it
    assert artifact.storage_bits(model) == plan.planned_bits


def compress_big_vocab(directory, text_file, out, *target):
    return run("compress", directory, *target, "--calib", text_file, "--calib-samples", 2, "--calib-len", 32,
               "--out", out)


@pytest.mark.parametrize("target", [["--target-bpw", "0.5"], ["--target-bpw", "0.45"]])
def test_a_target_the_capped_ranks_leave_room_for_is_met(target, big_vocab_dir, text_file, tmp_path):
    result = compress_big_vocab(big_vocab_dir, text_file, tmp_path / "x", *target)
    assert result.exit_code == 0, result.output
    bpw = json.loads((tmp_path / "x" / artifact.MANIFEST).read_text())["totals"]["bits_per_weight"]
    assert 0.98 * float(target[1]) <= bpw <= float(target[1])


@pytest.mark.parametrize("target", [["--target-bpw", "1e-300"], ["--target-ratio", "1e9"], ["--target-bpw", "0.2"]])
def test_a_target_below_the_smallest_plan_names_what_it_stores(target, big_vocab_dir, text_file, tmp_path):
    """Before: 'asvd: rank=469 is at or past the break-even rank ... set rank to 1..21', a key the
    user never set; now beyond reach, naming the smallest plan's stored size, which works."""
    result = compress_big_vocab(big_vocab_dir, text_file, tmp_path / "x", *target)
    assert_one_line_error(result, "beyond reach", "the smallest plan", " stores ", "ask for at least --target-bpw",
                          "a --target-ratio of at most")
    assert "set rank to" not in result.stderr and not (tmp_path / "x").exists()
    stores = float(re.search(r" stores (\d+\.\d+) bpw \((\d+\.\d+)x\)", result.stderr).group(1))
    hint = float(re.search(r"at least --target-bpw (\d+\.\d+)", result.stderr).group(1))
    ratio = float(re.search(r"--target-ratio of at most (\d+\.\d+)", result.stderr).group(1))
    assert stores <= hint <= stores * 1.02 and stores <= 16 / ratio <= stores * 1.02
    done = compress_big_vocab(big_vocab_dir, text_file, tmp_path / "y", "--target-ratio", ratio)
    assert done.exit_code == 0, done.output
    bpw = json.loads((tmp_path / "y" / artifact.MANIFEST).read_text())["totals"]["bits_per_weight"]
    assert bpw == pytest.approx(stores, rel=1e-3)
