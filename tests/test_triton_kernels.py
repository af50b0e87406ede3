"""Our Triton kernels (kernels/triton_quant.py): exact to the stored codes in Triton's interpreter
on the CPU; dispatch, configs and fallbacks; and, marked cuda, on the GPU through `load`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypercompress.kernels import triton_quant as tq

HERE = Path(__file__).resolve().parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the lent GPU)")


@pytest.fixture(scope="module")
def interpreted():
    """{case: record} from tests/triton_interpret_cases.py run under TRITON_INTERPRET=1."""
    if tq.triton is None:
        pytest.skip("Triton is not installed")
    path = os.pathsep.join(p for p in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}  # keep the caller's packages
    done = subprocess.run([sys.executable, str(HERE / "triton_interpret_cases.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    old = tuple(int(part) for part in tq.triton.__version__.split(".")[:2]) < (3, 9)
    if done.returncode and old and "only 0-dimensional arrays can be converted" in done.stderr:
        # Triton 3.6's interpreter (torch 2.11's CUDA wheels) turns a runtime loop bound into a
        # 1-element array, which NumPy 2 refuses as an index; 3.9 runs these cases. The CUDA tests
        # below check the compiled kernels on the GPU.
        pytest.skip(f"Triton {tq.triton.__version__}'s interpreter cannot run a runtime loop bound under NumPy 2")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in records}


def test_every_width_zero_kind_and_path_matches_the_reference(interpreted):
    """1..8 bits; symmetric, integer and float zeros; groups of 32..128 and 96; the CUDA-core
    and tensor-core paths, position-wise and interleaved (and the group sum), with and without
    split-K and bias; rows not multiples of any tile."""
    assert len(interpreted) == 16 * 8
    for case, record in interpreted.items():
        if case.startswith("dequantize"):
            assert record["error"] < 1e-6, case  # float32 out: (q - z) s exactly as the reference
            continue
        bound = 1.6e-2 if "bfloat16" in case else 2e-3  # rounding of y (and of W for the dot)
        assert record["error"] < bound, (case, record["error"])
        rows = int(case.rsplit("rows", 1)[1])
        out_features = int(case.split()[3].split("x")[0])
        assert record["shape"] == [rows, out_features], case
        assert record["dtype"] == ("torch.bfloat16" if "bfloat16" in case else "torch.float16"), case


def test_tiles_and_buckets():
    assert [tq.tile_k(g) for g in (32, 64, 96, 128, 192, 256, 512, 48)] == [32, 64, 32, 128, 64, 256, 256, None]
    assert [tq.token_bucket(r) for r in (1, 2, 4, 5, 16, 17, 300)] == [1, 4, 4, 16, 16, 64, 256]
    assert tq.size_class(11008, 4096) == "large" and tq.size_class(1536, 576) == "small"


@pytest.mark.parametrize("name, family", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                          ("NVIDIA A100-SXM4-80GB", "A100"), ("Tesla T4", "T4"),
                                          ("NVIDIA L40S", "L40S"), ("Some GPU", "Some GPU")])
def test_gpu_family_from_the_device_name(name, family, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert tq.gpu_family(torch.device("cuda")) == family


def test_configs_come_from_the_table_else_the_heuristic(tmp_path, monkeypatch):
    table = {"H100": {"configs": {"w4-m1-large": {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4,
                                                  "USE_DOT": False, "INTERLEAVE": True, "GROUPSUM": True,
                                                  "num_warps": 8, "num_stages": 3},
                                  "w4-m16-large": {"BLOCK_N": 64}},  # incomplete: ignored
                      "gemm_rows": {"w4-large": 128, "w4-small": "x"}}}
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(tq, "CONFIG_FILE", path)
    tq.tuned_table.cache_clear()
    try:
        assert tq.config_for("H100", 4, 1, 11008, 4096)["BLOCK_N"] == 64
        assert tq.config_for("H100", 4, 9, 11008, 4096) == tq.heuristic_config(9, 11008, 4096)
        assert tq.config_for("H200", 4, 1, 11008, 4096) == tq.heuristic_config(1, 11008, 4096)
        assert tq.gemm_rows_for("H100", 4, 11008, 4096) == 128
        assert tq.gemm_rows_for("H100", 4, 576, 576) == tq.DEFAULT_GEMM_ROWS
        assert tq.gemm_rows_for("H100", 2, 11008, 4096) == tq.DEFAULT_GEMM_ROWS
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
        table["H100"]["prefer"] = {"w4-large": "triton", "w2-large": "other"}
        path.write_text(json.dumps(table))
        tq.tuned_table.cache_clear()
        cuda = torch.device("cuda")
        assert tq.triton_preferred(cuda, 4, 11008, 4096)
        assert not tq.triton_preferred(cuda, 2, 11008, 4096)  # measured slower: the old path stays
        assert not tq.triton_preferred(cuda, 4, 576, 576)  # never measured: the old path stays
        for damaged in ({"H100": []}, {"H100": {"configs": [], "gemm_rows": None}},
                        {"H100": {"configs": {"w4-m1-large": {**table["H100"]["configs"]["w4-m1-large"], "BLOCK_N": 3}}}},
                        {"H100": {"configs": {"w4-m1-large": {**table["H100"]["configs"]["w4-m1-large"], "USE_DOT": 1}}}}):
            path.write_text(json.dumps(damaged))
            tq.tuned_table.cache_clear()
            assert tq.config_for("H100", 4, 1, 11008, 4096) == tq.heuristic_config(1, 11008, 4096)
            assert tq.gemm_rows_for("H100", 4, 11008, 4096) == tq.DEFAULT_GEMM_ROWS
            assert not tq.triton_preferred(cuda, 4, 11008, 4096)
        path.write_text("{not json")
        tq.tuned_table.cache_clear()
        assert tq.tuned_table() == {} and tq.gemm_rows_for("H100", 4, 11008, 4096) == tq.DEFAULT_GEMM_ROWS
    finally:
        tq.tuned_table.cache_clear()


def test_the_shipped_table_is_well_formed():
    table = tq.tuned_table()
    for family, entry in table.items():
        for key, config in entry["configs"].items():
            bits, bucket, size = key.split("-")
            assert bits[0] == "w" and int(bucket[1:]) in tq.TOKEN_BUCKETS and size in ("large", "small"), key
            assert tq._valid_config(config), key
            assert tq.config_for(family, int(bits[1:]), int(bucket[1:]), *(
                (11008, 4096) if size == "large" else (1536, 576))) == {k: config[k] for k in tq.CONFIG_KEYS}
        assert all(isinstance(v, int) and v > 0 for v in entry["gemm_rows"].values())


@pytest.mark.parametrize("rows", [1, 3, 16, 64, 200])
def test_heuristic_configs_fill_the_gpu_and_fit_the_tiles(rows):
    config = tq.heuristic_config(rows, 11008, 4096)
    assert config["USE_DOT"] == (rows > 1) and (config["BLOCK_M"] >= 16 or not config["USE_DOT"])
    programs = -(-11008 // config["BLOCK_N"]) * -(-rows // config["BLOCK_M"]) * config["SPLIT_K"]
    assert programs >= 132 and 4096 // config["SPLIT_K"] >= config["BLOCK_K"]


def test_the_cpu_and_huge_layers_are_declined_with_a_reason():
    assert "32-bit" in tq.triton_supported(torch.device("cuda"), torch.bfloat16, 4, 1 << 20, 1 << 20, 128)
    assert tq.triton_supported(torch.device("cpu"), torch.bfloat16, 4, 64, 128, 128) in (
        "the Triton kernels run on CUDA", "Triton is not installed")


# ---- on the GPU (pytest -m cuda on the lent machine; skipped elsewhere) ----

def _artifact(model_dir, stage, out):
    from hypercompress.apply import apply_recipe
    from hypercompress.modules import count_params
    from hypercompress.recipe import Recipe
    from hypercompress.sources.models import load_model
    from hypercompress.storage import artifact

    loaded = load_model(str(model_dir))
    recipe = Recipe.from_list([{"method": "rtn", **stage}])
    apply_recipe(loaded.model, recipe)
    artifact.save(loaded.model, loaded.tokenizer, out, recipe=recipe.to_list(),
                  original_params=count_params(loaded.model))
    return out


STAGES = [{"bits": 4, "group_size": 32}, {"bits": 3, "group_size": 64}, {"bits": 2, "group_size": 32, "symmetric": True},
          {"bits": 4, "group_size": 32, "zero_point": "float"}, {"bits": 8, "group_size": 64, "symmetric": True},
          {"bits": 4, "group_size": -1}]


@cuda
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("rows", [1, 4, 16, 300])
def test_cuda_fast_logits_equal_the_reference(stage, rows, model_dirs, tmp_path, monkeypatch):
    """bfloat16 on the GPU: the Triton path (and above gemm_rows, dequantize + GEMM) is no further from
    the bfloat16 reference than that is from float32, times 3."""
    from hypercompress.storage import artifact

    monkeypatch.setattr(tq, "triton_preferred", lambda *args: True)  # whatever the table measured

    path = _artifact(model_dirs["llama"], stage, tmp_path / "a")
    fast, _ = artifact.load(path, dtype=torch.bfloat16, device="cuda")
    reference, _ = artifact.load(path, dtype=torch.bfloat16, device="cuda", fast=False)
    exact, _ = artifact.load(path, dtype=torch.float32, device="cuda", fast=False)
    assert fast.hypercompress_backends and all(
        b.startswith("triton") for b in fast.hypercompress_backends.values()), fast.hypercompress_backends
    ids = torch.randint(1, 121, (1, rows), device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
    with torch.inference_mode():
        got, want, true = (m(ids).logits.float() for m in (fast, reference, exact))
    assert float((got - want).abs().max()) <= 3 * float((want - true).abs().max()) + 1e-3 * float(true.abs().max())
    assert not torch.equal(got, torch.zeros_like(got))


@cuda
def test_cuda_kernel_memory_is_the_stored_bytes(model_dirs, tmp_path, monkeypatch):
    from hypercompress.layers import QuantLinear
    from hypercompress.storage import artifact

    monkeypatch.setattr(tq, "triton_preferred", lambda *args: True)
    path = _artifact(model_dirs["llama"], {"bits": 3, "group_size": 32}, tmp_path / "a")
    model, _ = artifact.load(path, dtype=torch.bfloat16, device="cuda")
    checked = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and isinstance(module._fast, tq.TritonQuantLinear):
            assert module._fast.qweight.data_ptr() == module.qweight.data_ptr()  # shared, not copied
            held = {v.data_ptr(): v for v in vars(module._fast).values() if isinstance(v, torch.Tensor)}
            assert sum(t.numel() * t.element_size() for t in held.values()) <= module.storage_bits() // 8 + 1
            checked += 1
    assert checked


def test_fast_path_tensors_are_marked_static_for_cuda_graphs_on_cuda_only():
    """A compiled step with CUDA graphs copies every tensor it takes as an input at each replay
    unless marked static: fast paths hold their tensors on plain objects, not as parameters."""
    from hypercompress.kernels.paths import DenseLinear

    path = DenseLinear(torch.randn(8, 4), torch.randn(8), torch.bfloat16)
    path.mark_static()  # on the CPU nothing records graphs: nothing marked
    assert not hasattr(path.weight, "_dynamo_static_input_type")
    path.device = torch.device("cuda")
    path.mark_static()
    assert path.weight._dynamo_static_input_type and path.bias._dynamo_static_input_type


@cuda
def test_cuda_load_decodes_greedy_calls_as_graph_replays(model_dirs, tmp_path):
    from hypercompress.layers.base import CompressedModule
    from hypercompress.storage import artifact

    path = _artifact(model_dirs["llama"], {"bits": 4, "group_size": 32}, tmp_path / "a")
    model, _ = artifact.load(path, dtype=torch.bfloat16, device="cuda")
    assert model.generation_config.cache_implementation == "static"  # transformers' path for other calls
    assert model.hypercompress_decode.startswith("greedy: our loop over a static KV cache, each step one CUDA graph")
    ids = torch.randint(1, 121, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    held = [v for m in model.modules() if isinstance(m, CompressedModule) and m._fast is not None
            for v in vars(m._fast).values() if isinstance(v, torch.Tensor)]
    assert held and all(hasattr(t, "_dynamo_static_input_type") for t in held)  # not copied per replay
    ours = model.generate(ids, **kwargs)
    assert model.hypercompress_greedy.last_path == "cuda graph"
    graphs = [step.graph for step in model.hypercompress_greedy._steps.values()]
    again = model.generate(ids, **kwargs)  # replays the recorded step
    assert [step.graph for step in model.hypercompress_greedy._steps.values()] == graphs
    static = type(model).generate(model, ids, **kwargs)  # transformers' compiled step
    dynamic = model.generate(ids, cache_implementation="dynamic", **kwargs)
    assert model.hypercompress_greedy.last_path.startswith("transformers (")
    assert ours.shape == (2, 20) and torch.equal(ours, again)
    assert torch.equal(ours[:, :9], static[:, :9]) and torch.equal(ours[:, :9], dynamic[:, :9])  # bf16 may part later


@cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "olmo2", "mixtral"])
def test_cuda_graph_greedy_equals_transformers_in_float32(arch):
    """The recorded step (static cache, our mask, positions advanced inside the graph) gives
    transformers' greedy tokens, left padding and end ids included."""
    from conftest import make_model
    from hypercompress.kernels.decode import use_fast_decode

    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model(arch).cuda()
    use_fast_decode(model)
    ids = torch.randint(4, 120, (3, 9), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2], ids[2, :5], mask[2, :5] = 0, 0, 0, 0
    for kwargs in (dict(max_new_tokens=40, pad_token_id=0), dict(max_new_tokens=40, pad_token_id=0, eos_token_id=[5, 9])):
        ours = model.generate(ids, attention_mask=mask, **kwargs)
        decoder = model.hypercompress_greedy
        if arch == "mixtral":  # experts gathered by data-dependent shapes may sync: then eager, said so
            assert decoder.last_path == "cuda graph" or decoder.graph_problem.startswith("its forward synchronizes")
        else:
            assert decoder.last_path == "cuda graph", decoder.graph_problem
        reference = model.generate(ids, attention_mask=mask, cache_implementation="dynamic", **kwargs)
        assert torch.equal(ours, reference), arch


def test_static_decode_is_set_on_cuda_only(model_dirs, tmp_path):
    """On the CPU `load` leaves transformers' generate dynamic (compiling did not pay there); greedy
    calls go through our loop, eagerly over a dynamic cache."""
    from hypercompress.kernels.decode import use_static_decode
    from hypercompress.storage import artifact

    path = _artifact(model_dirs["llama"], {"bits": 4, "group_size": 32}, tmp_path / "a")
    model, _ = artifact.load(path)
    assert use_static_decode(model) is None
    assert model.generation_config.cache_implementation is None
    assert model.hypercompress_decode.startswith("greedy: our loop over transformers' dynamic KV cache, eager")


def test_lm_eval_generation_decodes_with_the_dynamic_cache_then_the_setting_returns(model_dirs, tmp_path):
    """lm-eval's generate_until makes one generate per new length: a static cache would recompile the
    step each time, so task_accuracy decodes dynamically inside and restores the setting after,
    also when the block raises."""
    from hypercompress.kernels.decode import dynamic_decode
    from hypercompress.storage import artifact

    model, _ = artifact.load(_artifact(model_dirs["llama"], {"bits": 4, "group_size": 32}, tmp_path / "a"))
    model.generation_config.cache_implementation = "static"  # as `load` sets it on CUDA
    seen = []
    with pytest.raises(RuntimeError):
        with dynamic_decode(model):
            seen.append(model.generation_config.cache_implementation)
            raise RuntimeError("a task failed")
    assert seen == [None] and model.generation_config.cache_implementation == "static"
    model.generation_config.cache_implementation = "offloaded"  # a user's own choice is left alone
    with dynamic_decode(model):
        assert model.generation_config.cache_implementation == "offloaded"


def _kernel_tune():
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    try:
        import kernel_tune
    finally:
        sys.path.pop(0)
    return kernel_tune


def test_the_tuner_ships_a_preference_only_where_the_gpu_checked_every_config():
    kt = _kernel_tune()
    errors = {f"w4-m{b}-large": 4e-3 for b in tq.TOKEN_BUCKETS} | {"w4-dequantize-large": 0.0}
    assert kt.verified({"errors": errors}, "w4-large")
    assert not kt.verified({}, "w4-large")  # a run from before the check: nothing verified
    assert not kt.verified({"errors": errors}, "w2-large")
    assert not kt.verified({"errors": {**errors, "w4-m16-large": 0.2}}, "w4-large")  # wrong on the GPU
    assert not kt.verified({"errors": {k: v for k, v in errors.items() if "m256" not in k}}, "w4-large")
    assert not kt.verified({"errors": {**errors, "w4-m1-large": "0"}}, "w4-large")


@pytest.mark.parametrize("content, needle", [(None, "not a readable JSON file"), ("{not json", "not a readable"),
                                             ("{}", "no family"), ('{"family": "H100"}', "no machine")])
def test_the_tuners_merge_refuses_a_bad_run_file_in_one_line(content, needle, tmp_path):
    table = tq.CONFIG_FILE.read_bytes() if tq.CONFIG_FILE.exists() else None
    file = tmp_path / "run.json"
    if content is not None:
        file.write_text(content)
    done = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "kernel_tune.py"), "merge", str(file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert (tq.CONFIG_FILE.read_bytes() if tq.CONFIG_FILE.exists() else None) == table  # nothing written
