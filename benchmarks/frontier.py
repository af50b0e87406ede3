"""The quality frontier of SmolLM2-135M at 4.0 / 3.0 / 2.5 / 2.0 whole-file bpw (issue 14).

    python benchmarks/frontier.py run --model M.gguf --device cuda --calib-text valid.txt \
        --test-text test.txt --target 3.0 --out DIR [--route planner|rotate] [--tag T]
    python benchmarks/frontier.py run --plan-only plan-3.0.json --target 3.0 --steps 400 --device cpu \
        --model M.gguf --calib-text valid.txt --out DIR  # plan here; then on the GPU: run --plan plan-3.0.json
    python benchmarks/frontier.py merge FILE...          # -> results/frontier.json + RESULTS.md

`--route planner` (one process per target; several run side by side on one GPU):
1. uniform GPTQ: the largest uniform recipe (every block linear at one bits/group option, the
   embedding at the largest option that fits) whose file stores at most the target;
2. planner: what `compress --target-bpw T` keeps (its mixed plan, or that uniform recipe when
   GPTQ trials measure it better: planning/choice.py);
3. planner + qat: the same with `--distill`, the recovery stage being `qat` (Block-AP, then end to
   end; calibration windows plus as many teacher-written ones).
`--route rotate`: `rotate`, then GPTQ w{bits} g64 on the block linears, RTN w{bits} g64 on the untied
lm_head, the embedding at `--embedding-bits` rows, then qat; beside the same without the rotation
(tied head: one table fewer, so fewer bits).
Calibration: `--calib-samples` windows of 512 tokens from the first 90% of the validation text
(seed 0); the last 10% gives held-out validation windows (the calibration domain, never trained
on). Every row is saved, reloaded from its artifact and measured in float32 on the GPU: WikiText-2
test perplexity on the first 64 windows and on all, KL and top-1 to the original, and the loss on
a second domain (Python standard-library docstrings, eval/domains.py) against the held-out
validation loss: `domain_gap` = (second-domain NLL increase / original NLL) / (validation NLL
increase / original NLL), i.e. how much more of its loss the model loses off its calibration domain.
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
from hypercompress.storage.artifact import round_to_storage  # noqa: E402
from hypercompress.planning.target import planned_recipe  # noqa: E402
from hypercompress.sources.data import calibration_samples, read_text, tokenize, windows  # noqa: E402
from hypercompress.eval import evaluate_windows, protocol_text  # noqa: E402
from hypercompress.eval.domains import describe, stdlib_docs_text  # noqa: E402
from hypercompress.recipe import Recipe  # noqa: E402
from hypercompress.planning.target import PlanTarget

FIRST = 64  # the first windows of the test text, the goals are stated on them


def calibration_windows(valid: torch.Tensor, count: int) -> torch.Tensor:
    """(count, 512) windows of the first 90% of the validation text's token ids `valid`, seed 0."""
    return calibration_samples(valid[:int(valid.numel() * 0.9)], count, 512, 0)


def qat_settings(args) -> dict:
    """The qat keys every route takes from the command line."""
    return {"steps": args.steps, "block_steps": args.block_steps, "lr": args.lr, "block_lr": args.block_lr,
            "teacher_fraction": args.teacher_fraction}


def target_text(target: float) -> str:
    """4.0 -> "4.0", 1.951 -> "1.951": a label names the target as it was asked for."""
    return f"{target:.1f}" if round(target, 1) == target else f"{target:g}"


def qat_label(args) -> str:
    mix = "" if args.teacher_fraction == 0.5 else f", {args.teacher_fraction:g} teacher-written"
    return f"qat ({args.steps} steps, lr {args.lr:g}{mix})"


class Texts:
    """The token windows every row is measured on, and the original's numbers there."""

    def __init__(self, teacher, tokenizer, args):
        valid = tokenize(tokenizer, read_text(args.calib_text))
        cut = int(valid.numel() * 0.9)
        self.calib = calibration_windows(valid, args.calib_samples)
        few = args.windows or None  # a quick run: that many windows of each text
        self.valid = windows(valid[cut:], 512, min(64, few or 64))
        test = tokenize(tokenizer, read_text(args.test_text))
        self.test, self.test_windows = windows(test, 512, few), test.numel() // 512
        domain = stdlib_docs_text()
        self.domain_name = describe(domain)
        self.domain = windows(tokenize(tokenizer, domain), 512, min(96, few or 96))
        self.device = args.device
        self.reference = copy.deepcopy(teacher).to(args.device, torch.float32)
        self.original = self.measure_model(self.reference, with_kl=False)

    def measure_model(self, model, with_kl=True) -> dict:
        teacher = self.reference if with_kl else None
        full = evaluate_windows(model, self.test, 8, teacher)
        first = evaluate_windows(model, self.test[:FIRST], 8, teacher)
        valid = evaluate_windows(model, self.valid, 8)
        domain = evaluate_windows(model, self.domain, 8)
        row = {"ppl_first64": first["ppl"], "ppl": full["ppl"], "kl": full.get("kl"), "top1": full.get("top1"),
               "kl_first64": first.get("kl"), "valid_nll": valid["nll"], "domain_nll": domain["nll"]}
        if with_kl:
            base = self.original
            valid_rise = (row["valid_nll"] - base["valid_nll"]) / base["valid_nll"]
            domain_rise = (row["domain_nll"] - base["domain_nll"]) / base["domain_nll"]
            row.update({"valid_rise": valid_rise, "domain_rise": domain_rise,
                        "domain_gap": domain_rise / valid_rise if valid_rise > 0 else None})
        return row

    def measure_artifact(self, student, tokenizer, recipe: list, params: int) -> dict:
        """Save, reload from the artifact (lossless stage 10, as size targets store), measure."""
        with tempfile.TemporaryDirectory() as tmp:
            path = artifact.save(student.cpu(), tokenizer, Path(tmp) / "a", recipe=recipe,
                                 original_params=params, lossless=10)
            size = (path / artifact.WEIGHTS).stat().st_size
            loaded, _ = artifact.load(path, fast=False)
        row = self.measure_model(loaded.to(self.device, torch.float32))
        return {"bits_per_weight": size * 8 / params, "safetensors_bytes": size, **row}


WRITTEN: dict = {"rows": []}  # this run's file, rewritten after every row (a run cut short keeps its rows)


def log(row: dict) -> None:
    keys = ("label", "bits_per_weight", "ppl_first64", "ppl", "kl", "domain_gap", "gpu_minutes")
    print(json.dumps({k: row.get(k) for k in keys}), flush=True)
    if "path" in WRITTEN:
        WRITTEN["payload"]["rows"].append(row)
        WRITTEN["path"].write_text(json.dumps(WRITTEN["payload"], indent=2))


def run_stages(label, stages, teacher, tokenizer, texts, params, args, seconds_before=0.0,
               label_before_last: str | None = None) -> list[dict]:
    """Compress a copy with `stages` and measure it; with `label_before_last`, the model as it is
    before the last stage (its codes before recovery) is measured too, from the same run."""
    from hypercompress.apply import _passes

    student, rows = copy.deepcopy(teacher), []
    recipe = Recipe.from_list(stages)
    passes = len(_passes(recipe))
    tick = time.perf_counter()

    def before_last(model) -> dict:
        before_last.calls += 1
        if label_before_last and before_last.calls == passes - 1:
            seconds = seconds_before + time.perf_counter() - tick
            snapshot = copy.deepcopy(model)
            round_to_storage(snapshot)
            rows.append({"label": label_before_last, "recipe": json.dumps(stages[:-1]),
                         "gpu_minutes": round(seconds / 60, 2),
                         **texts.measure_artifact(snapshot, tokenizer, stages[:-1], params)})
            log(rows[-1])
            return {"measure_seconds": time.perf_counter() - tick - seconds + seconds_before}
        return {}

    before_last.calls = 0
    last = [0.0]

    def progress(stage, label, done, total):  # a line every 30 s: how far each stage is, for the next run's plan
        now = time.perf_counter() - tick
        if now - last[0] >= 30 or done == total:
            last[0] = now
            print(f"[{now:7.1f} s] stage {stage} {label}: {done}/{total}", flush=True)

    report = apply_recipe(student, recipe, texts.calib, device=args.device, after_stage=before_last,
                      progress=progress)
    measuring = sum(st.get("measure_seconds", 0) for st in report["stages"])
    seconds = seconds_before + time.perf_counter() - tick - measuring
    rows.append({"label": label, "recipe": json.dumps(stages), "gpu_minutes": round(seconds / 60, 2),
                 **texts.measure_artifact(student, tokenizer, stages, params)})
    log(rows[-1])
    return rows


def with_qat(stages: list[dict], args) -> list[dict]:
    out = []
    for stage in stages:
        if stage["method"] == "qat":
            stage = {**stage, **qat_settings(args)}
        out.append(stage)
    return out


def make_plan(teacher, calib, args) -> dict:
    """What `compress --target-bpw T [--distill]` plans (its recipe and allocation), timed."""
    from hybrid import machine_text

    tick = time.perf_counter()
    recipe, allocation = planned_recipe(copy.deepcopy(teacher), PlanTarget(args.target), calib, args.steps, 10,
                                        args.device)
    return {"target_bpw": args.target, "recipe": recipe.to_list(), "allocation": allocation,
            "planning_seconds": round(time.perf_counter() - tick, 1), "planned_on": f"{args.device}: {machine_text()}"}


def plan_only(args) -> None:
    """`run --plan-only FILE`: plan on this machine (the sensitivities are float32: every CPU plans
    alike) and write the plan, so a GPU run (`--plan FILE`) spends its time on GPTQ, qat and measuring."""
    from common import gpu_run_setup

    teacher, tokenizer = gpu_run_setup(args)[:2]
    plan = make_plan(teacher, calibration_windows(tokenize(tokenizer, read_text(args.calib_text)),
                                                  args.calib_samples), args)
    Path(args.plan_only).write_text(json.dumps(plan, indent=2))
    print(f"planned {args.target} bpw in {plan['planning_seconds']:.0f} s: {plan['allocation'].get('notes')}")


def read_plan(args) -> dict | None:
    """The plan of --plan FILE, checked against --target before any model is loaded (None without one)."""
    if not args.plan:
        return None
    plan = json.loads(Path(args.plan).read_text())
    if plan["target_bpw"] != args.target:
        raise SystemExit(f"{args.plan} was planned for {plan['target_bpw']} bpw, not --target {args.target}: pass "
                         f"--target {plan['target_bpw']}, or make a plan with --plan-only FILE --target {args.target}")
    return checked(plan, args.plan)


def checked(plan: dict, source: str) -> dict:
    """`plan`, refused (naming `source`) when its recipe does not end in qat: its rows are qat rows."""
    if plan["recipe"][-1]["method"] != "qat":
        raise SystemExit(f"{source} has no qat stage (planned with --steps 0): plan with --steps > 0")
    return plan


def planner_rows(teacher, tokenizer, texts, params, args) -> list[dict]:
    rows = []
    plan = read_plan(args) or checked(make_plan(teacher, texts.calib, args), "the plan made here")
    recipe, allocation = Recipe.from_list(plan["recipe"]), plan["allocation"]
    planning = 0.0 if args.plan else plan["planning_seconds"]  # a plan made elsewhere: its time is its own
    stages = with_qat(recipe.to_list(), args)
    route = allocation["route"]
    trials = {k: v for k, v in allocation.get("trial_kl", {}).items() if k.startswith("uniform")}
    if trials and not args.skip_uniform:  # the uniform recipe the planner measured best beside its plan
        best = min(trials, key=trials.get)
        rows += run_stages(f"{target_text(args.target)} bpw target: {best} (GPTQ)", allocation["trial_recipes"][best],
                           teacher, tokenizer, texts, params, args)
    kept = next((n for n in allocation.get("notes", []) if n.startswith("kept")), route)
    rows += run_stages(f"{target_text(args.target)} bpw target: {route} + {qat_label(args)}",
                       stages, teacher, tokenizer, texts, params, args, planning,
                       label_before_last=f"{target_text(args.target)} bpw target: {route} ({kept})")
    for row in rows:
        row.update({"target_bpw": args.target, "trial_kl": allocation.get("trial_kl"),
                    "planning_minutes": round(plan["planning_seconds"] / 60, 2), "planned_on": plan["planned_on"]})
    return rows


def rotate_rows(teacher, tokenizer, texts, params, args) -> list[dict]:
    qat = {"method": "qat", "batch": 8, **qat_settings(args)}
    grid = {"method": "gptq", "bits": args.bits, "group_size": 64}
    embedding = {"method": "rtn", "bits": args.embedding_bits, "group_size": -1, "targets": [r"^model\.embed_tokens$"]}
    plain = [embedding, grid, qat]
    head = {"method": "rtn", "bits": args.bits, "group_size": 64, "targets": ["^lm_head$"]}  # qat trains it too
    rotated = [{"method": "rotate"}, embedding, head, grid, qat]
    rows, variants = [], []
    if args.rotation in ("both", "off"):
        variants.append((f"GPTQ w{args.bits} g64, embedding w{args.embedding_bits} rows + qat", plain))
    if args.rotation in ("both", "on"):
        variants.append((f"rotate + GPTQ w{args.bits} g64 (lm_head RTN), embedding w{args.embedding_bits} rows + qat",
                         rotated))
    for label, stages in variants:
        rows += run_stages(label, stages, teacher, tokenizer, texts, params, args,
                           label_before_last=label.replace(" + qat", " (before qat)"))
    return rows


def uniform_rows(teacher, tokenizer, texts, params, args) -> list[dict]:
    """GPTQ with one (bits, group) for every block linear, the embedding RTN at one option, then qat."""
    from hypercompress.planning.mixed_bits import option_label

    linear, embedding = (tuple(int(x) for x in v.split(",")) for v in (args.linear, args.embedding))
    stages = [{"method": "rtn", "bits": embedding[0], "group_size": embedding[1], "targets": [r"^model\.embed_tokens$"]},
              {"method": "gptq", "bits": linear[0], "group_size": linear[1]},
              {"method": "qat", "batch": args.batch, **qat_settings(args)}]
    label = (f"{target_text(args.target)} bpw target: uniform GPTQ, linears {option_label(linear)}, embedding "
             f"{option_label(embedding)}")
    rows = run_stages(f"{label} + {qat_label(args)}", stages, teacher, tokenizer, texts, params, args,
                      label_before_last=label)
    for row in rows:
        row["target_bpw"] = args.target
    return rows


ROUTES = {"planner": planner_rows, "rotate": rotate_rows, "uniform": uniform_rows}


def run(args) -> None:
    from common import gpu_run_setup
    from hybrid import machine_text

    if args.plan_only:
        return plan_only(args)
    read_plan(args)  # a wrong plan file is refused before the model loads
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as stated
    teacher, tokenizer, params, _, _, _ = gpu_run_setup(args)
    texts = Texts(teacher, tokenizer, args)
    protocol = (protocol_text("WikiText-2 raw test", 512, texts.test.shape[0], texts.test_windows, torch.float32,
                              "the uncompressed model", args.device)
                + f"; ppl_first64: its first {FIRST} windows; second domain: {texts.domain_name}, "
                f"{texts.domain.shape[0]} windows; held-out validation: 64 windows of the last 10% of the "
                f"validation text (calibration: {args.calib_samples} windows of the first 90%)")
    out = Path(args.out) / f"frontier-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    WRITTEN.update(path=out, payload={"rows": [], "protocol": protocol, "machine": machine_text(),
                                      "command": " ".join(sys.argv)})
    log({"label": "original (16-bit)", "bits_per_weight": 16.0, **texts.original})
    rows = ROUTES[args.route](teacher, tokenizer, texts, params, args)
    for row in rows:  # the planner's target and trial KLs, known once its rows are done
        stored = next(r for r in WRITTEN["payload"]["rows"] if r["label"] == row["label"])
        stored.update(row)
    out.write_text(json.dumps(WRITTEN["payload"], indent=2))


def arrange(old: list[dict], new: list[dict]) -> list[dict]:
    rows, seen = [], set()
    for row in new + old:
        if row["label"] not in seen:
            seen.add(row["label"])
            rows.append(row)

    def target(row: dict) -> float:  # a run cut short wrote its rows before their target_bpw
        head = row["label"].split(" bpw target:")[0]
        return row.get("target_bpw") or (float(head) if head.replace(".", "", 1).isdigit() else 99)

    return sorted(rows, key=lambda r: (-r["bits_per_weight"] if r["label"].startswith("original") else 0,
                                       -target(r), r["label"]))


def main() -> None:
    from common import merge_runs, run_merge_parser

    parser, r = run_merge_parser(__doc__.splitlines()[0], "cuda", 128)
    r.add_argument("--target", type=float, default=3.0)
    r.add_argument("--route", choices=tuple(ROUTES), default="planner")
    r.add_argument("--linear", default="3,64", help="--route uniform: bits,group of the block linears")
    r.add_argument("--embedding", default="4,-1", help="--route uniform: bits,group of the embedding")
    r.add_argument("--steps", type=int, default=400, help="qat end-to-end steps (8 windows each)")
    r.add_argument("--block-steps", type=int, default=100, help="qat Block-AP steps per block")
    r.add_argument("--batch", type=int, default=8, help="--route uniform: qat windows per step")
    r.add_argument("--lr", type=float, default=1.5e-4, help="qat end-to-end learning rate")
    r.add_argument("--block-lr", type=float, default=2e-4)
    r.add_argument("--teacher-fraction", type=float, default=0.5, help="qat: share of teacher-written windows")
    r.add_argument("--bits", type=int, default=3, help="--route rotate: GPTQ bits")
    r.add_argument("--plan", help="--route planner: a plan written by --plan-only (else planned here)")
    r.add_argument("--plan-only", metavar="FILE", help="only plan --target (as compress --target-bpw --distill "
                   "plans) and write the plan to FILE")
    r.add_argument("--skip-uniform", action="store_true",
                   help="--route planner: leave out the best uniform recipe's row (measured by --route uniform)")
    r.add_argument("--embedding-bits", type=int, default=4, help="--route rotate: embedding bits")
    r.add_argument("--rotation", choices=("both", "off", "on"), default="both",
                   help="--route rotate: the rows without the rotation, with it, or both (one after the other)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        merge_runs("frontier", "The quality frontier at 2-4 bits on SmolLM2-135M", args.files, arrange)


if __name__ == "__main__":
    main()
