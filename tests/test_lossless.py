"""Lossless stage: byte grouping + zstd round-trips every tensor exactly, artifacts shrink and reload."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from hypercompress.storage import artifact
from hypercompress.apply import apply_recipe
from hypercompress.storage.inspection import inspect as inspect_artifact
from hypercompress.errors import UserError
from hypercompress.formats import lossless
from hypercompress.sources.models import load_model
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8,
                                   torch.int64, torch.bool])
def test_every_dtype_round_trips_bit_for_bit(dtype):
    torch.manual_seed(0)
    values = torch.randn(37, 11) * 3
    tensor = values > 0 if dtype == torch.bool else values.to(dtype)
    blob, entry = lossless.encode(tensor)
    back = lossless.decode(blob, entry)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_byte_planes_split_elements_by_byte():
    tensor = torch.tensor([0x0102, 0x0304], dtype=torch.int16)
    low, high = lossless.byte_planes(tensor)
    assert (low, high) == (b"\x02\x04", b"\x01\x03")  # little-endian: byte 0 is the low byte


def test_gaussian_float16_shrinks_and_uniform_bytes_stay_raw():
    torch.manual_seed(0)
    _, entry = lossless.encode((torch.randn(256, 256) * 0.02).half())
    coded = sum(length for _, length in entry["planes"])
    assert coded < 0.9 * 256 * 256 * 2  # the exponent plane codes well
    blob, entry = lossless.encode(torch.randint(0, 256, (4096,), dtype=torch.uint8))
    assert entry["planes"] == [["raw", 4096]] and blob.numel() == 4096


def test_a_corrupt_blob_is_a_one_line_error():
    blob, entry = lossless.encode(torch.randn(64, 64).half())
    broken = blob.clone()
    broken[-broken.numel() // 4:] = 7  # inside the zstd-coded exponent plane
    with pytest.raises(UserError, match="does not decode"):
        lossless.decode(broken, entry, "w")


@pytest.fixture(scope="module")
def pair(model_dirs, tmp_path_factory):
    """The same RTN-compressed llama saved plain and with the lossless stage."""
    loaded = load_model(str(model_dirs["llama"]))
    recipe = Recipe.from_list([{"method": "rtn", "bits": 4, "group_size": 32}])
    apply_recipe(loaded.model, recipe)
    root, params = tmp_path_factory.mktemp("lossless"), count_params(loaded.model)
    plain = artifact.save(loaded.model, loaded.tokenizer, root / "plain", recipe=recipe.to_list(),
                          original_params=params)
    coded = artifact.save(loaded.model, loaded.tokenizer, root / "coded", recipe=recipe.to_list(),
                          original_params=params, lossless=10)
    return plain, coded


def test_lossless_artifact_is_smaller_and_decodes_to_the_same_bytes(pair):
    plain, coded = pair
    assert (coded / artifact.WEIGHTS).stat().st_size < (plain / artifact.WEIGHTS).stat().st_size
    manifest = json.loads((coded / artifact.MANIFEST).read_text())
    report = manifest["lossless"]["report"]
    assert "quant.qweight" in report and "dense.float16" in report
    assert report["dense.float16"]["ratio"] > 1.0
    assert manifest["totals"]["bits_per_weight"] == pytest.approx(
        (coded / artifact.WEIGHTS).stat().st_size * 8 / manifest["original_params"])
    (model_a, _), (model_b, _) = artifact.load(plain), artifact.load(coded)
    digest = lambda m: hashlib.sha256(b"".join(  # noqa: E731
        t.contiguous().view(torch.uint8).numpy().tobytes() for t in m.state_dict().values())).hexdigest()
    assert digest(model_a) == digest(model_b)
    ids = torch.randint(0, 128, (2, 16))
    assert torch.equal(model_a(ids).logits, model_b(ids).logits)


def test_inspect_counts_the_coded_bytes_and_reports_ratios(pair):
    plain, coded = pair
    a, b = inspect_artifact(plain), inspect_artifact(coded)
    assert b["bits_per_weight"] < a["bits_per_weight"]
    assert {m["name"]: m["params"] for m in a["modules"]} == {m["name"]: m["params"] for m in b["modules"]}
    assert b["lossless"]["report"] and a["lossless"] is None


def test_same_input_same_lossless_artifact(pair, tmp_path):
    _, coded = pair
    model, tokenizer = artifact.load(coded)
    manifest = json.loads((coded / artifact.MANIFEST).read_text())
    again = artifact.save(model, tokenizer, tmp_path / "again", recipe=manifest["recipe"],
                          original_params=manifest["original_params"], lossless=10)
    assert (again / artifact.WEIGHTS).read_bytes() == (coded / artifact.WEIGHTS).read_bytes()


def test_bad_level_is_refused_before_writing(pair, tmp_path):
    model, tokenizer = artifact.load(pair[0])
    with pytest.raises(UserError, match="1..22"):
        artifact.save(model, tokenizer, tmp_path / "x", recipe=[], original_params=1, lossless=40)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
