"""Neural weight representations against low-rank at equal storage on SmolLM2 (GPU).

    python benchmarks/neural.py run --model M.gguf --device cuda --budgets 2,1 --parts svd,distill,hypernet,kan \
        --calib-text valid.txt --test-text test.txt --out DIR       # rows -> DIR/neural-*.json
    python benchmarks/neural.py merge FILE...                      # -> results/neural.json + RESULTS.md

At a whole-model budget B bpw (all safetensors bytes x 8 / original parameters), every row shares the
same frame: the tied embedding quantized by RTN (4-bit rows at 2 bpw, 3-bit at 1, 2-bit at 0.5) or
factorized (rank 32, 4-bit codes, at 0.25), norms in float16; the block linears get what is left:
  svd:       truncated SVD factors (float16) of one rank for every matrix, the largest that fits;
  distill:   the same SVD factors trained by distillation (the ablation: no hypernetwork);
  hypernet:  the Solomonoff generator (generate mode), sized to fit, distilled the same way;
  hypernet8: the same with the generator stored as 8-bit codes (so about twice the parameters);
  dit:       the generator with the diffusion transformer head instead of the MLP head;
  kan:       the KAN hierarchical compressor (2 levels), sized to fit (weight reconstruction only);
  residual:  2-bit GPTQ rows + a small generator trained on what GPTQ leaves (about 2 bpw only).
The path rows: latent interpolation between the hypernetwork and a short fine-tune of the teacher
(its latents mapped by the Set Transformer encoder), and a model generated from noise latents.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypercompress import artifact  # noqa: E402
from hypercompress.apply import apply_recipe  # noqa: E402
from hypercompress.arch import block_linear_names  # noqa: E402
from hypercompress.eval import evaluate_windows, protocol_text  # noqa: E402
from hypercompress.methods.hypernet.config import HypernetConfig  # noqa: E402
from hypercompress.layers.hypernet.generator import HyperGenerator  # noqa: E402
from hypercompress.methods.hypernet.method import block_linear_grid  # noqa: E402
from hypercompress.layers.base import linear_weight
from hypercompress.modules import count_params
from hypercompress.recipe import Recipe  # noqa: E402

EMBEDDING = {2.0: 4, 1.0: 3, 0.5: 2, 0.25: "r32"}  # tied embedding per budget: RTN bits (rows) or a factorization


def embedding_stage(bits) -> dict:
    targets = ["^model\\.embed_tokens$"]
    if bits == "r32":
        return {"method": "factor_embedding", "rank": 32, "bits": 4, "targets": targets}
    return {"method": "rtn", "bits": bits, "group_size": -1, "targets": targets}


def linear_budget_bits(teacher, budget: float) -> tuple[int, int]:
    """Bits left for the block linears at `budget` after the frame, and sum(out + in) over them."""
    frame = copy.deepcopy(teacher).cpu()
    apply_recipe(frame, Recipe.from_list([embedding_stage(EMBEDDING[budget])]))
    shapes = [linear_weight(frame.get_submodule(n)).shape for n in block_linear_names(frame)]
    dense_linear_bits = sum(o * i for o, i in shapes) * 16
    left = int(budget * count_params(teacher)) - (artifact.storage_bits(frame) - dense_linear_bits)
    return left, sum(o + i for o, i in shapes)


def hypernet_size(teacher, bits: int, **options) -> dict:
    """The generator to train at `bits` (options: value_bits, head: counted as stored): the widest
    backbone (256, 128, 64) that still fits a rank of at least 16, at the largest rank on the ladder;
    below that, the largest rank at width 64. Width 512 is left out: at lr 1e-3 it diverged in both
    measured runs (2 bpw, and 1 bpw with 8-bit values), and a rank-2 factor at width 256 diverged at
    0.25 bpw, so rank comes before width."""
    grid = block_linear_grid(teacher)
    layers, shapes = len(grid), [list(linear_weight(teacher.get_submodule(n)).shape) for n in grid[0]]
    ranks = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
    for d_hidden, least in ((256, 16), (128, 16), (64, 16), (64, 1)):
        for rank in (r for r in ranks if r >= least):
            size = dict(rank=rank, d_z=64, d_hidden=d_hidden, block=64, **options)
            if stored_bits(HyperGenerator(layers, shapes, **size)) <= bits:
                return size
    raise SystemExit(f"no generator fits {bits} bits")


def stored_bits(generator: HyperGenerator) -> int:
    """Bits of the generator as the hypernet method saves it: float16, its matrices as codes."""
    generator.half().quantize_values()
    return generator.storage_bits()


def kan_size(sum_dims: int, matrices: int, bits: int, levels: int = 2, hidden: int = 8, grid: int = 4) -> dict:
    """Code size c with levels x (sum(out + in) x c + KAN params x matrices) float16 values <= bits."""
    for code in range(64, 0, -1):
        kan = 2 * code * hidden * (grid * 2 + 3 + 1) + hidden * (grid * 2 + 3 + 1) + 1  # finest level bound
        if levels * (sum_dims * code + matrices * kan) * 16 <= bits:
            return dict(num_levels=levels, hidden=hidden, code_dim=code, grid=grid)
    raise SystemExit(f"no KAN fits {bits} bits")


def measure(label: str, budget: float | None, stages: list[dict], teacher, tokenizer, calib, test, device,
            params: int, notes: str = "") -> dict:
    """Compress a copy of the teacher, save, reload (timing decompression), evaluate on `device`."""
    student = copy.deepcopy(teacher).cpu()
    recipe = Recipe.from_list(stages)
    tick = time.perf_counter()
    apply_recipe(student, recipe, calib, device=device)
    seconds = time.perf_counter() - tick
    with tempfile.TemporaryDirectory() as tmp:
        path = artifact.save(student, tokenizer, Path(tmp) / "a", recipe=recipe.to_list(), original_params=params)
        size = (path / artifact.WEIGHTS).stat().st_size
        tick = time.perf_counter()
        loaded, _ = artifact.load(path)
        load_seconds = time.perf_counter() - tick
    decompress = getattr(getattr(loaded, "hypernet", None), "decompress_seconds", None)
    result = evaluate_windows(loaded.to(device), test, 16, teacher.to(device))
    row = {"label": label, "budget_bpw": budget, "bits_per_weight": size * 8 / params,
           "safetensors_bytes": size, "compress_seconds": round(seconds, 1),
           "train_gpu_minutes": round(seconds / 60, 2) if device != "cpu" else None,
           "load_seconds": round(load_seconds, 2),
           "decompress_seconds": None if decompress is None else round(decompress, 3),
           "recipe": json.dumps(recipe.to_list()), "notes": notes, **result}
    print(json.dumps({k: row[k] for k in ("label", "bits_per_weight", "ppl", "kl", "compress_seconds")}), flush=True)
    return row


def tuned(args) -> str:
    """Label suffix for hypernetwork training settings other than the defaults."""
    return ("" if args.hypernet_lr == 1e-3 else f" lr {args.hypernet_lr:g}") + \
        ("" if args.steps == 600 else f" {args.steps} steps") + \
        ("" if args.warm_steps == 300 else f" warm {args.warm_steps}")


def run(args) -> None:
    from common import gpu_run_setup

    teacher, tokenizer, params, calib, ids, test = gpu_run_setup(args)
    parts = args.parts.split(",")
    train = {"steps": args.steps, "batch": 8, "seed": 0}
    protocol = protocol_text("WikiText-2 raw test", 512, test.shape[0], ids.numel() // 512, torch.float32,
                             "the uncompressed model", args.device)
    rows = Rows(Path(args.out) / f"neural-{args.tag}.json", protocol)
    for budget in [float(b) for b in args.budgets.split(",") if b]:
        if budget not in EMBEDDING:
            raise SystemExit(f"budget {budget}: choose from {', '.join(map(str, EMBEDDING))}")
        bits, sum_dims = linear_budget_bits(teacher, budget)
        frame = [embedding_stage(EMBEDDING[budget])]
        rank = max(bits // (16 * sum_dims), 1)
        if "svd" in parts:
            rows.append(measure(f"svd r{rank} @ {budget}", budget, frame + [{"method": "svd", "rank": rank}],
                                teacher, tokenizer, calib, test, args.device, params))
        if "distill" in parts:
            rows.append(measure(f"svd r{rank} + distill @ {budget}", budget,
                                frame + [{"method": "svd", "rank": rank},
                                         {"method": "distill", "lr": 1e-4, **train}],
                                teacher, tokenizer, calib, test, args.device, params))
        if "hypernet" in parts:
            size = hypernet_size(teacher, bits)
            rows.append(measure(f"hypernet r{size['rank']} h{size['d_hidden']}{tuned(args)} @ {budget}", budget,
                                frame + [{"method": "hypernet", **size, "warm_steps": args.warm_steps,
                                          "lr": args.hypernet_lr, **train}],
                                teacher, tokenizer, calib, test, args.device, params))
        for part, options in (("hypernet8", {"value_bits": 8}), ("dit", {"head": "dit"})):
            if part in parts:
                size = hypernet_size(teacher, bits, **options)
                rows.append(measure(f"{part} r{size['rank']} h{size['d_hidden']}{tuned(args)} @ {budget}", budget,
                                    frame + [{"method": "hypernet", **size, "warm_steps": args.warm_steps,
                                              "lr": args.hypernet_lr, **train}],
                                    teacher, tokenizer, calib, test, args.device, params))
        if "kan" in parts:
            size = kan_size(sum_dims, 7 * 30, bits)
            rows.append(measure(f"kan c{size['code_dim']} @ {budget}", budget,
                                frame + [{"method": "kan", **size, "steps": args.kan_steps, "batch": 16384,
                                          "together": 30, "lr": 1e-2, "device": args.device}],
                                teacher, tokenizer, calib, test, args.device, params))
    if "residual" in parts:
        base = [embedding_stage(2), {"method": "gptq", "bits": 2, "group_size": -1, "act_order": True}]
        rows.append(measure("gptq w2row (residual base)", None, base, teacher, tokenizer, calib, test,
                            args.device, params))
        rows.append(measure("gptq w2row + hypernet residual", None,
                            base + [{"method": "hypernet", "mode": "residual", "rank": 16, "d_z": 32,
                                     "d_hidden": 128, "block": 64, "warm_steps": args.warm_steps,
                                     "lr": 1e-3, **train}],
                            teacher, tokenizer, calib, test, args.device, params))
    if "path" in parts:
        rows += latent_paths(teacher, tokenizer, calib, test[: args.path_windows], args, params)


class Rows(list):
    """Rows written to `path` after every append, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, protocol: str):
        super().__init__()
        self.path, self.protocol = path, protocol
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        super().append(row)
        self._write()

    def __iadd__(self, rows):
        super().__iadd__(rows)
        self._write()
        return self

    def _write(self) -> None:
        self.path.write_text(json.dumps({"rows": list(self), "protocol": self.protocol,
                                         "machine": machine_text(), "command": " ".join(sys.argv)}, indent=2))


def latent_paths(teacher, tokenizer, calib, test, args, params) -> list[dict]:
    """Interpolate latents between the hypernetwork (z_A) and a fine-tuned teacher (z_B = z_A +
    E(W_B) - E(W_A), E the warm start's Set Transformer), and generate from noise latents."""
    from hypercompress.methods.hypernet.method import Hypernet, encode_weights
    from hypercompress.modules import select_linears

    device = args.device
    budget = 1.0
    bits, _ = linear_budget_bits(teacher, budget)
    size = hypernet_size(teacher, bits)
    config = HypernetConfig(**size, warm_steps=args.warm_steps, steps=args.steps, batch=8, lr=1e-3)
    student = copy.deepcopy(teacher).cpu()
    apply_recipe(student, Recipe.from_list([embedding_stage(EMBEDDING[budget])]))
    method = Hypernet(config)
    names = select_linears(student, None, [])
    method.apply(student, names, copy.deepcopy(teacher).cpu(), calib, device=device)
    other = finetune(copy.deepcopy(teacher), calib, device, args.finetune_steps)
    grid = block_linear_grid(teacher)
    weights = lambda m: [[linear_weight(m.get_submodule(n)).to(device) for n in row] for row in grid]  # noqa: E731
    generator = student.hypernet.float().to(device)
    z_a = generator.z.detach().clone()
    z_b = z_a + encode_weights(method.encoder, weights(other), config.block) \
        - encode_weights(method.encoder, weights(teacher), config.block)
    student.to(device)
    rows = []
    other_eval = evaluate_windows(other.to(device).eval(), test, 16, teacher.to(device))
    rows.append({"label": "fine-tuned teacher (checkpoint B)", "notes": "path end point, dense", **other_eval})
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        set_latents(generator, (1 - alpha) * z_a + alpha * z_b)
        result = evaluate_windows(student, test, 16, teacher)
        rows.append({"label": f"interpolation alpha={alpha}", "notes": "z = (1-a) z_A + a z_B", **result})
    torch.manual_seed(0)
    noise = z_a.mean() + z_a.std() * torch.randn_like(z_a)
    set_latents(generator, noise)
    rows.append({"label": "generated from noise latents", "notes": "z ~ N(mean z_A, std z_A)",
                 **evaluate_windows(student, test, 16, teacher)})
    for row in rows:
        print(json.dumps({k: row.get(k) for k in ("label", "ppl", "kl")}), flush=True)
    return rows


@torch.no_grad()
def set_latents(generator, z) -> None:
    generator.install(generator(z))


def finetune(model, calib, device, steps: int = 60, lr: float = 2e-5):
    """Checkpoint B: a short causal-LM fine-tune of the teacher on the calibration windows."""
    model.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        batch = calib[(torch.arange(4) + 4 * step) % calib.shape[0]].to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def machine_text() -> str:
    from common import machine

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; {machine()}"


def table_order(row: dict) -> float:
    """Budgets from the largest down; the GPTQ residual rows (about 2 bpw) after the 2 bpw rows and
    the path rows (no budget) last."""
    if row.get("budget_bpw") is not None:
        return -row["budget_bpw"]
    return -1.99 if row["label"].startswith("gptq") else 1.0


def merge(files: list[str]) -> None:
    """Rows of the run files into results/neural.json; rows already there that no file re-measured
    (by label) are kept, with their command and machine."""
    from common import merge_runs

    def arrange(old: list[dict], rows: list[dict]) -> list[dict]:
        labels, budgets = {r["label"] for r in rows}, {r.get("budget_bpw") for r in rows}
        kept = [r for r in old if r["label"] not in labels
                and not ("error" in r and r.get("budget_bpw") in budgets)]
        return sorted(kept + rows, key=table_order)

    merge_runs("neural", "Neural weight representations vs low-rank at equal storage (SmolLM2-135M, GPU)",
               files, arrange)


def main() -> None:
    from common import run_merge_parser

    parser, r = run_merge_parser(__doc__.splitlines()[0], "cuda", 128)
    r.add_argument("--budgets", default="2,1,0.5,0.25")
    r.add_argument("--parts", default="svd,distill,hypernet,kan,residual,path")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--warm-steps", type=int, default=300)
    r.add_argument("--kan-steps", type=int, default=500)
    r.add_argument("--hypernet-lr", type=float, default=1e-3)
    r.add_argument("--path-windows", type=int, default=64)
    r.add_argument("--finetune-steps", type=int, default=60, help="steps of the checkpoint-B fine-tune")
    args = parser.parse_args()
    run(args) if args.command == "run" else merge(args.files)

if __name__ == "__main__":
    main()
