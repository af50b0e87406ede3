"""analyze: the Gaussian rate-distortion bound where the answer is known, the report on tiny models,
and the command's bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from hypercompress.analysis.bounds import gaussian_distortion, gaussian_rate, source_spectrum, water_level
from hypercompress.analysis.layer_rd import layer_points
from hypercompress.analysis.report import analyze_windows
from hypercompress.analysis.weights import code_entropy, spectrum_stats
from hypercompress.cli import app

from conftest import tied_llama, message_lines

runner = CliRunner()


def with_singular_values(sigma: list[float], out: int = 64) -> torch.Tensor:
    """A (out, len(sigma)) matrix whose singular values are exactly `sigma`."""
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(out, len(sigma), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(sigma), len(sigma), generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def test_reverse_water_filling_matches_the_closed_form():
    out = 64
    # eigenvalues sigma^2 / out = 4 and 1; water level 0.5 -> D = 1 of 5, R = 1/2 log2 8 + 1/2 log2 2 = 2 bits
    spectrum = source_spectrum(with_singular_values([math.sqrt(4 * out), math.sqrt(out)], out))
    assert torch.allclose(spectrum, torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert water_level(spectrum, 0.2) == pytest.approx(0.5, rel=1e-9)
    assert gaussian_rate(spectrum, 0.2, dims=2) == pytest.approx(1.0, rel=1e-9)
    # a water level above the small eigenvalue: that component gets no bits (theta 1 of 4 and 0.25)
    spectrum = torch.tensor([4.0, 0.25], dtype=torch.float64)
    assert gaussian_rate(spectrum, 1.25 / 4.25, dims=2) == pytest.approx(0.5, rel=1e-9)
    assert gaussian_distortion(spectrum, 0.5, dims=2) == pytest.approx(1.25 / 4.25, rel=1e-6)


def test_an_iid_gaussian_matrix_needs_half_log2_of_one_over_d():
    """The textbook case: iid N(0, 1) weights (out >> in: a flat spectrum), R(D) = 1/2 log2(1/D)."""
    w = torch.randn(8192, 16, generator=torch.Generator().manual_seed(1))
    spectrum = source_spectrum(w)
    for d in (0.25, 0.05, 0.01):
        assert gaussian_rate(spectrum, d, dims=16) == pytest.approx(0.5 * math.log2(1 / d), rel=0.03)


def test_no_method_beats_the_bound_on_a_gaussian_layer():
    """Gaussian weights, white Gaussian inputs: R(D) is a true lower bound, every point lies above it."""
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(512, 64, generator=generator)
    x = torch.randn(4096, 64, generator=generator)
    points = layer_points(w, x.double().T @ x.double())
    assert {p["method"] for p in points} == {"RTN", "GPTQ", "SVD"}
    for p in points:
        assert p["excess_bits"] > 0 and p["relative_error"] > p["bound_error"], p
    gptq = {p["setting"]: p["relative_error"] for p in points if p["method"] == "GPTQ"}
    rtn = {p["setting"]: p["relative_error"] for p in points if p["method"] == "RTN"}
    assert all(gptq[k] <= rtn[k] * 1.01 for k in gptq)  # the solver never loses to rounding on its own objective


def test_ranks_of_a_known_spectrum():
    stats = spectrum_stats(with_singular_values([1.0] * 8).float())
    assert stats["effective_rank"] == pytest.approx(8, rel=1e-4) and stats["stable_rank"] == pytest.approx(8, rel=1e-4)
    stats = spectrum_stats(with_singular_values([1.0] + [0.0] * 7).float())
    assert stats["effective_rank"] == pytest.approx(1, rel=1e-3) and stats["stable_rank"] == pytest.approx(1, rel=1e-4)


def test_code_entropy_of_stored_codes():
    from hypercompress.apply import apply_recipe
    from hypercompress.recipe import Recipe

    model = tied_llama(256)
    apply_recipe(model, Recipe.from_list([{"method": "rtn", "bits": 3, "group_size": 32}]))
    entropy = code_entropy(model.model.layers[0].mlp.up_proj)
    assert entropy["bits"] == 3 and 0 < entropy["entropy_bits"] <= 3
    assert entropy["codes"] == 128 * 64


def test_the_report_on_a_tiny_model(tmp_path):
    model = tied_llama(256)
    samples = torch.randint(1, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    result = analyze_windows(model, samples, tmp_path / "report", text_name="random tokens")
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.md", "analysis.json", "spectra.png", "rate_distortion.png", "flow.png", "importance.png"} <= files
    saved = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert "random tokens: 4 windows of 32 tokens" in saved["protocol"]
    assert len(result["flow"]) == 2 and len(result["weights"]) == 15  # embedding + 2 x 7 linears
    with torch.no_grad():  # the logit lens after the last block is the model's own loss
        logits = model(input_ids=samples).logits
        own = F.cross_entropy(logits[:, :-1].flatten(0, 1), samples[:, 1:].flatten())
    assert result["flow"][-1]["lens_nll"] == pytest.approx(float(own), rel=1e-4)
    assert all(0 <= r["influence"] <= 2 for r in result["flow"][:-1])
    assert set(result["rate_distortion"]) == {n for n, m in model.named_modules()
                                              if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert "model.layers.1.mlp.down_proj" in result["fisher"] and result["sensitivity"]
    assert result["symmetry"]["rotation"] and len(result["symmetry"]["permutation"]) == 1
    assert result["topology"]["block"] == 1 and "## Topology" in (tmp_path / "report" / "report.md").read_text()


def test_the_command_writes_a_report(model_dirs, calib_file, tmp_path):
    out = tmp_path / "analysis"
    result = runner.invoke(app, ["analyze", str(model_dirs["llama"]), "--calib", str(calib_file), "--out", str(out),
                                 "--calib-samples", "2", "--calib-len", "32", "--no-sensitivity",
                                 "--rd-layer", "model.layers.0.mlp.down_proj"])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and "least influential block" in result.output
    data = json.loads((out / "analysis.json").read_text())
    assert list(data["rate_distortion"]) == ["model.layers.0.mlp.down_proj"] and "sensitivity" not in data


@pytest.mark.parametrize("case", ["missing model", "unknown layer", "existing out", "empty calib"])
def test_bad_input_is_one_line_and_writes_nothing(case, model_dirs, calib_file, tmp_path):
    out = tmp_path / "analysis"
    model, calib, extra = str(model_dirs["llama"]), str(calib_file), []
    if case == "missing model":
        model = str(tmp_path / "nope")
    elif case == "unknown layer":
        extra = ["--rd-layer", "model.layers.0.mlp.nothing"]
    elif case == "existing out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        calib = str(tmp_path / "empty.txt")
        (tmp_path / "empty.txt").write_text("")
    result = runner.invoke(app, ["analyze", model, "--calib", calib, "--out", str(out), "--calib-samples", "2",
                                 "--calib-len", "32", "--no-sensitivity", *extra])
    assert result.exit_code == 2, result.output
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    if case == "existing out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".analysis")]


def test_weight_matching_recovers_a_shuffled_copy():
    from hypercompress.analysis.symmetry import weight_matching

    a = F.normalize(torch.randn(40, 12, generator=torch.Generator().manual_seed(3)), dim=1)
    shuffle = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    perm, plain, aligned = weight_matching(a, a[shuffle])
    assert torch.equal(a[shuffle][perm], a) and aligned == pytest.approx(1.0) and plain < 0.5


def test_rotation_spreads_an_outlier_channel():
    """A residual channel 50x larger than the rest (as SmolLM2's massive activations): the rotated
    stream and the weights reading it have far fewer outliers; the model itself is left as it was."""
    from hypercompress.analysis.symmetry import rotation_outliers

    model = tied_llama(256)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50
    before = model.model.embed_tokens.weight.clone()
    stats = rotation_outliers(model, torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    stream = stats["stream"]
    assert stream["after"]["max_over_median"] < stream["before"]["max_over_median"] / 3
    assert stream["after"]["kurtosis"] < stream["before"]["kurtosis"]
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_persistence_finds_the_loop_of_a_circle():
    from hypercompress.analysis.topology import persistence

    angle = torch.linspace(0, 2 * math.pi, 101, dtype=torch.float64)[:-1]
    circle = torch.stack([angle.cos(), angle.sin()], 1)
    circle = circle / torch.cdist(circle, circle).median()
    found = persistence(circle, threshold=0.3)
    assert found["h1_bars"] == 1 and found["h0_bars"] == 1 and found["h1_longest"][0] > 0.5


def test_the_python_api_is_what_the_command_runs(model_dirs, calib_file, tmp_path):
    """hypercompress.analyze takes a source and a text file as the command does, reports its steps to a
    progress function, and gives the same numbers for the same windows; a loaded model needs its tokenizer."""
    import hypercompress
    from hypercompress.errors import UserError
    from hypercompress.sources.models import load_model

    steps = []
    options = dict(calib_samples=2, calib_len=32, sensitivity=False, rd_layers=["model.layers.0.mlp.down_proj"])
    result = hypercompress.analyze(str(model_dirs["llama"]), calib_file, out=tmp_path / "report",
                                   progress=lambda section, done, total, note="": steps.append((section, done)), **options)
    assert (tmp_path / "report" / "report.md").is_file() and str(calib_file) in result["protocol"]
    assert ("loading " + str(model_dirs["llama"]), 1) in steps and ("rate-distortion", 1) in steps
    loaded = load_model(str(model_dirs["llama"]))
    with pytest.raises(UserError, match="tokenizer"):
        hypercompress.analyze(loaded.model, calib_file, progress=False, **options)
    again = hypercompress.analyze(loaded.model, calib_file, tokenizer=loaded.tokenizer, progress=False, **options)
    assert [r["lens_nll"] for r in again["flow"]] == [r["lens_nll"] for r in result["flow"]]  # the same windows
    with pytest.raises(UserError, match="--device"):
        hypercompress.analyze(loaded.model, calib_file, tokenizer=loaded.tokenizer, device="gpu", progress=False)
