"""The training engine (training/): the chunked KL equals the plain one in value and gradient; micro-
batches accumulate to the whole batch's step; bf16 training lands near fp32; the token budget sets the
steps and the time budget shortens the schedule; bad budgets are one-line errors (exit 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_model, message_lines, tied_llama
from hypercompress.cli import app
from hypercompress.errors import UserError
from hypercompress.training import engine as engine_module
from hypercompress.training.distill import DistillSettings, distill
from hypercompress.training.engine import Clock, Engine, recovery_defaults
from hypercompress.training.kl import chunked_kl, kl_to_teacher


def test_chunked_kl_equals_the_plain_kl_in_value_and_gradients():
    torch.manual_seed(0)
    h_s = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(37, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    plain = kl_to_teacher(h_t @ w_t.t(), h_s @ w_s.t())
    plain.backward()
    want = (h_s.grad.clone(), w_s.grad.clone())
    h_s.grad = w_s.grad = None
    chunked = chunked_kl(h_s, w_s, h_t, w_t, chunk=8)  # five chunks, the last of 5 positions
    (2.0 * chunked).backward()
    assert torch.allclose(chunked.double(), plain.double(), rtol=1e-5)
    assert torch.allclose(h_s.grad, 2 * want[0], rtol=1e-4, atol=1e-8)
    assert torch.allclose(w_s.grad, 2 * want[1], rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="shapes"):
        chunked_kl(h_s, w_s[:, :8], h_t, w_t)


def _trained(model, teacher, engine: Engine, steps=3, batch=4, seed=0):
    student = copy.deepcopy(model)
    params = {n: p for n, p in student.named_parameters() if n.endswith("mlp.down_proj.weight")}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    windows = torch.randint(1, 120, (8, 16), generator=torch.Generator().manual_seed(1))
    history = distill(student, teacher, windows, params, lambda: None,
                      DistillSettings(steps, batch, 1e-2, seed=seed, engine=engine), "cpu")
    return history, {n: p.detach().clone() for n, p in params.items()}


def test_micro_batches_accumulate_to_the_whole_batch_step():
    model, teacher = make_model("llama"), make_model("llama")
    torch.manual_seed(5)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    whole, a = _trained(model, teacher, Engine(precision="fp32"))
    micro, b = _trained(model, teacher, Engine(precision="fp32", micro_batch=1))
    assert [round(h["loss"], 5) for h in whole] == [round(h["loss"], 5) for h in micro]
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)  # the steps move them by ~2e-2
    assert whole[-1]["tokens"] == 3 * 4 * 16 and all(h["tokens_per_second"] > 0 for h in whole)


def test_bf16_training_lands_near_the_fp32_reference_and_the_teacher_is_left_alone():
    model, teacher = make_model("llama"), make_model("llama")
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p, generator=None))
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    ref, a = _trained(model, teacher, Engine(precision="fp32"))
    half, b = _trained(model, teacher, Engine(precision="bf16"))
    assert all(t.dtype == torch.float32 for t in b.values())  # float32 masters
    assert abs(half[0]["kl"] - ref[0]["kl"]) < 0.05 * ref[0]["kl"] + 1e-3
    for n in a:  # the same updates up to bf16 rounding (Adam's normalisation magnifies tiny gradients)
        start = dict(model.named_parameters())[n]
        assert torch.cosine_similarity((a[n] - start).flatten(), (b[n] - start).flatten(), 0) > 0.9
    assert abs(half[-1]["loss"] - ref[-1]["loss"]) < 0.05 * ref[-1]["loss"]
    assert all(torch.equal(before[n], t) and t.dtype == torch.float32 for n, t in teacher.state_dict().items())


def test_the_token_budget_sets_the_steps():
    model, teacher = tied_llama(128), tied_llama(128)
    history, _ = _trained(model, teacher, Engine(precision="fp32", train_tokens=5 * 4 * 16 - 10), steps=100)
    assert len(history) == 5 and history[-1]["tokens"] == 5 * 64


def test_the_time_budget_shortens_the_schedule(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: now[0])
    clock = Clock(steps=1000, max_minutes=1.0)
    for step in range(1, 50):
        now[0] += 2.0  # 2 s a step: 30 steps fit in the minute
        planned = clock.planned(step)
        if now[0] >= 60:
            break
    assert clock.shortened and planned <= 31 and planned == step
    assert Clock(steps=10, max_minutes=0).planned(3) == 10  # no limit


def test_defaults_on_cuda_scale_with_the_model_and_a_cpu_keeps_the_step_count():
    small, large = recovery_defaults(134_515_008, "cuda"), recovery_defaults(6_738_000_000, "cuda")
    assert small["train_tokens"] > 10 * large["train_tokens"] and small["max_minutes"] == 10
    assert small["corpus_tokens"] == 3_000_000 and small["train_tokens"] == 54_000_000
    assert small["teacher_fraction"] == large["teacher_fraction"] == 0.9
    assert recovery_defaults(134_515_008, "cpu") == {}


@pytest.mark.parametrize("engine, needle", [(Engine(micro_batch=3), "micro_batch"),
                                            (Engine(train_tokens=-1), "train_tokens"),
                                            (Engine(max_minutes=-1.0), "max_minutes"),
                                            (Engine(precision="fp8"), "precision")])
def test_bad_engine_settings_are_refused_by_name(engine, needle):
    with pytest.raises(UserError, match=needle):
        engine.validate(batch=4)


@pytest.mark.parametrize("option, needle", [(["--train-tokens", "0"], "--train-tokens"),
                                            (["--max-minutes", "0"], "--max-minutes"),
                                            (["--max-minutes", "-3"], "--max-minutes")])
def test_bad_budgets_are_one_line_errors_before_any_work(model_dirs, calib_file, tmp_path, option, needle):
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--target-bpw", "4", "--distill",
                                      "--calib", str(calib_file), "--out", str(tmp_path / "out"), *option])
    lines = message_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--train-tokens", "100"], ["--max-minutes", "1"], ["--distill-steps", "5"]])
def test_a_training_option_on_a_run_that_trains_nothing_is_refused(model_dirs, tmp_path, option):
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--method", "rtn",
                                      "--out", str(tmp_path / "out"), *option])
    lines = message_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1 and option[0] in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_distill_refusal_names_targets_that_allow_for_qat_s_room():
    """With --distill the search runs on target / QAT_CODE_GROWTH: the targets it names are the
    sizes it found times that factor, so asking for one is not refused again."""
    from hypercompress.planning.fit import Trial, unreachable_message
    from hypercompress.planning.mixed_bits import QAT_CODE_GROWTH

    message = unreachable_message(3.9, 0.02, Trial(None, 3.70), Trial(None, 4.20), hint_scale=QAT_CODE_GROWTH)
    asked = [float(v) for v in __import__("re").findall(r"--target-bpw (\d+\.\d+)", message)]
    assert asked[0] >= 3.70 * QAT_CODE_GROWTH and asked[0] / QAT_CODE_GROWTH <= 3.70 * 1.001
    assert asked[1] >= 4.20 * QAT_CODE_GROWTH


def test_the_bf16_teacher_copy_casts_parameters_keeps_buffers_ties_and_the_original():
    from conftest import make_model

    from hypercompress.training.engine import cast_copy

    for arch in ("llama", "gpt2"):
        model = make_model(arch)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        copy = cast_copy(model, "cpu", torch.bfloat16)
        assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in copy.parameters())
        assert all(b.dtype == o.dtype for b, o in zip(copy.buffers(), model.buffers()))  # RoPE stays float32
        assert (copy.get_output_embeddings().weight is copy.get_input_embeddings().weight) == \
            (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
        assert all(torch.equal(before[n], t) and t.dtype == torch.float32 for n, t in model.state_dict().items()
                   if t.is_floating_point())
        ids = torch.randint(1, 120, (2, 8))
        assert torch.allclose(copy(ids).logits.float(), model(ids).logits, atol=0.05)


def test_modules_differing_only_in_bit_width_share_one_compiled_graph():
    """Compiled blocks of a mixed plan share one graph whatever their modules' bit widths (the top
    code is a tensor), so a plan mixing widths does not run dynamo past its recompile limit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hypercompress.methods.qat.fake_quant import FakeQuantLinear

    class Block(torch.nn.Module):
        def __init__(self, bits):
            super().__init__()
            self.proj = FakeQuantLinear.from_dense(torch.nn.Linear(64, 32, bias=False), bits, 32)

        def forward(self, x):
            return self.proj(x).sum()

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(2, 64)
    for bits in (2, 3, 4, 8):
        block = Block(bits)
        block.compile(backend="eager", dynamic=False)
        block(x).backward()
        assert block.proj.weight.grad is not None
    assert counters["stats"]["unique_graphs"] == 1


def test_compiling_the_blocks_leaves_dynamo_room_for_a_graph_per_block():
    import torch._dynamo

    from hypercompress.training.engine import Engine, compile_blocks, uncompile_blocks

    model = make_model("llama")
    blocks = len(model.model.layers)
    before = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        compile_blocks(model, Engine(compile=True), "cpu")
        assert torch._dynamo.config.recompile_limit >= 2 * blocks + 8
        uncompile_blocks(model)
    finally:
        torch._dynamo.config.recompile_limit = before


def test_a_teacher_with_a_stored_head_takes_the_chunked_kl():
    """A teacher compressed by an earlier stage (its tied embedding quantized: a TiedHead) gives its
    dense head matrix, so the KL runs in chunks instead of holding (B T, V) float32 logits; the
    matrix gives the head's own logits. A head with a bias still falls back to full logits."""
    from hypercompress.apply import apply_recipe
    from hypercompress.layers.quant_embedding import TiedHead
    from hypercompress.recipe import Recipe
    from hypercompress.training.distill import head_matrix

    model = tied_llama(128)
    apply_recipe(model, Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 16,
                                           "targets": ["embed_tokens$"]}]), None)
    head = model.get_output_embeddings()
    assert isinstance(head, TiedHead)
    matrix = head_matrix(model)
    assert matrix is not None and matrix.shape == (128, 64)
    hidden = torch.randn(3, 64)
    torch.testing.assert_close(hidden @ matrix.t(), head(hidden), rtol=1e-5, atol=1e-5)
    biased = make_model("llama")
    biased.lm_head = torch.nn.Linear(64, 128, bias=True)
    assert head_matrix(biased) is None
