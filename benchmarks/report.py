"""Render benchmarks/RESULTS.md from every benchmarks/results/*.json (run: python benchmarks/report.py)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
COLUMNS = [("label", "method", "{}"), ("bits_per_weight", "bpw (whole model)", "{:.3f}"),
           ("ratio_vs_16bit", "ratio vs 16-bit", "{:.2f}x"), ("weights", "weights computed with", "{:,}"),
           ("ppl", "perplexity", "{:.3f}"), ("kl", "KL (nats/token)", "{:.4f}"),
           ("top1", "top-1", "{:.4f}"), ("compress_seconds", "compress s", "{:.2f}"),
           ("peak_memory_gib", "peak memory GiB", "{:.2f}"), ("train_gpu_minutes", "GPU min", "{:.2f}"),
           ("decompress_seconds", "decompress s", "{:.3f}"), ("cpu_tokens_per_second", "CPU tok/s", "{}"),
           ("wall_seconds", "wall s", "{:.1f}"), ("cpu", "cpu", "{}"), ("notes", "notes", "{}"),
           ("error", "error", "{}"),
           ("command", "command", "`{}`")]


# What a reader needs to read a section right (written with the scripts, not results)
NOTES = {
    "speed": [
        "The CPU float32 rows predate the float32 int4 path (a float32 caller's decode-sized calls now take "
        "the int4 kernel in bfloat16; before, its quantized layers ran dense): the CPU float32 and SmolLM2 "
        "rows after that change are in the 2-core Xeon section below (another CPU: compare within a section).",
    ],
    "speed_cpu": [
        "Reading: a float32 caller's 4-bit layer decodes a token 5.4x faster than dense float32 (1.13 vs "
        "6.13 ms at 4096 x 11008) and SmolLM2 w4 g64 decodes 1.9x faster than its dense float32 original "
        "(49.4 vs 25.4 tok/s). At 16 tokens a float32 caller runs the dense float32 weight it keeps (about the "
        "time of dense). In bfloat16 this CPU's dense GEMM (AMX) beats the int4 kernel from a few tokens on: "
        "2.3-2.4x slower at 16 tokens, so the CPU's bfloat16 crossover (256 rows, measured on an AMD EPYC) "
        "does not hold here. The original decodes about as fast through our greedy loop as through "
        "transformers' generate (25.4 vs 24.4 float32, 21.2 vs 21.0 bfloat16: one run each).",
    ],
    "rotation": [
        "Block linears only (groups of 64, asymmetric; GPTQ act-order, 128 x 512 calibration tokens of the "
        "validation text); the embedding stays float16. rotate unties SmolLM2's lm_head (the final norm "
        "folds into the head, not the embedding), so its rows store a second float16 table: +3.37 bpw. "
        "These rows are therefore not at equal bytes; they show what the rotation does to the error.",
        "Reading: the rotation helps GPTQ at 4 and 3 bits (35.48 -> 33.78, 61.84 -> 53.00). It hurts RTN "
        "at 4 and 3 bits (39.91 -> 58.08, 100.9 -> 2282) and GPTQ at 2 bits (3301 -> 13827). A likely "
        "cause is SmolLM2's massive residual channels: spread by the rotation, they meet every "
        "column's rounding error. A rotation therefore pays only with an error-correcting solver here, and "
        "only once the head is quantized too (equal bytes); that, learned rotations (SpinQuant) and qat "
        "remain for issue 14.",
    ],
    "baseline": [
        "Whole-model bpw includes the 16-bit token embedding (28.3M of 134.5M parameters, tied with "
        "lm_head), so RTN w4 g64 is 4.31 bpw on the block linears but 6.78 bpw for the model; "
        "embedding quantization is the next lever.",
        "This SmolLM2 is the dequantized Q4_1 GGUF (see ../shared/DESIGN.md): its block linears already "
        "lie on a 4-bit g32 grid, so RTN w4 g64 with an integer zero point loses 32%; plain SVD destroys "
        "it even at 80% of the parameters (its MLP weights have no low-rank structure).",
    ],
    "anchors": [
        "Both libraries get the same 32 x 512 calibration tokens and are evaluated by the same code on "
        "the same windows against the same cached teacher log-probs; each row runs in a fresh process, "
        "one at a time; compress seconds time the library call only (ours: compress(); llm-compressor: "
        "oneshot()); peak memory is the process's max RSS right after it (model load included).",
        "Our rows are evaluated after saving the artifact and loading it back; llm-compressor's model is "
        "evaluated in memory after oneshot(), and its size is the safetensors bytes of "
        "save_pretrained(save_compressed=True) after casting to bfloat16 (as its users save). For the "
        "pruned models it wrote dense 16-bit tensors (16.0 bpw): no sparse format was chosen. Ours store "
        "a 1-bit mask plus float16 kept values (10.48 bpw with the 16-bit embedding).",
        "GPTQ settings: ours act_order=true (static groups), damp 0.01, block 128; llm-compressor's "
        "defaults (actorder static, dampening 0.01, block 128). Wanda uses the same score on both sides "
        "(|W| x ||X||_2, per output row); the gap comes from the calibration pipelines (ours re-runs each "
        "pruned block to feed the next), not investigated further.",
        "Planner rows: the whole model (embedding included) at the target; sensitivities measured on the "
        "first 256 tokens of one calibration window (one forward per module at 3-bit rows, other options "
        "scaled by output error), candidate plans compared by their measured joint KL; planning time is "
        "included in compress seconds. Rows with plan_route in their JSON were planned as `compress "
        "--target-bpw` plans since issue 14 (float32 sensitivities, the plan fitted to its file with the "
        "lossless stage 10, then GPTQ trials of the plan and the largest uniform recipes that fit, the "
        "lowest KL kept; stored with the lossless stage); the others predate that. Uniform yardsticks: uniform-w3row-all is every linear (GPTQ) and "
        "the embedding (RTN) at 3 bits with one scale per row (3.04 bpw, the uniform point nearest 3.0), "
        "uniform-w3g64-all the same with groups of 64 (3.30 bpw). planner-2.0bpw is refused: 2-bit rows "
        "everywhere are already 2.03 bpw.",
        "The cpu column says where each row ran: the llm-compressor pairs ran together on the AMD EPYC "
        "machine; the planner and uniform rows were re-run on an Intel Xeon without native bf16 (a "
        "planner revision); compare compress seconds only within one cpu. GPTQ on the two CPUs differs "
        "in float rounding (uniform-w3g64-all: 116.99 on AMD, 113.12 on Intel). The Intel rows ran "
        "beside other work (planner-3.0bpw's 855 s most of all) and all show the same 7.89 GiB max "
        "RSS, a peak common to every process there (not investigated).",
        "The previous planner (exact KL of 4 bit-widths per module, measured in bf16 on AMD) gave "
        "276.85 at 3.0 bpw and 5599 at 2.5; this one (7 options, output-error-scaled, 5x fewer "
        "forwards) gives 43.29 at 4.0 (was 44.57) but 344.35 at 3.0 and 11598 at 2.5: its scaled "
        "sensitivities are RTN's, while GPTQ applies them; GPTQ-aware errors are the next step.",
    ],
    "hybrid": [
        "Each row is `hypercompress compress smollm2-135m --target-ratio R` (calibration: 32 windows "
        "of the validation text, seed 0), saved with the lossless stage (zstd 10), reloaded and "
        "evaluated; bpw is the stored file. At 4x the budget planner (GPTQ bits per module by measured "
        "sensitivity). The two 4x rows predate fitting the plan to the stored file: the planner then "
        "planned 4.0 bpw of tensors and the lossless stage brought the file to 3.67 bpw (4.36x); it now "
        "re-plans until the file is within 2% of the target (RTN trials), so a rerun spends about 9% "
        "more bits (not re-measured: no GPU time was left). Below the quantization floor (2.03 bpw) the hybrid pipeline: the embedding option of "
        "lowest measured KL within half the budget (4-bit rows at 8x; at 16x and beyond every option "
        "breaks the tied head alone, KL 6-8, so the one of lowest table error: 4-bit factors of rank "
        "256, 128, 32, then 1), whitened low-rank factors filled block by block, blocks removed when "
        "rank 1 does not fit (21 of 30 at 1000x). '+ distill 600': the same compression, then 600 "
        "steps of distillation recovery (8 x 512 calibration tokens a step, AdamW lr 1e-4, KL + "
        "per-block output matching) training the factors, the quantization scales, the embedding's "
        "factor and row scales, and the norms; the row without it is the same model stored just "
        "before that stage. CPU tokens/s: float32, batch 1, 512 tokens, 2 threads of the run's host "
        "CPU (so comparable between rows, not with the CI machine). Wall time counts from planning; "
        "a recovery row's includes its no-recovery row.",
        "Below the floor nothing reaches a usable model on SmolLM2-135M: without recovery the "
        "perplexity is 1e4-1e5; recovery brings every ratio to 1000-2200, and 600 steps limit it "
        "(32x + distill beats 16x + distill: fewer factors to train in the same steps).",
        "Anchor rows are the lowest-perplexity single-method rows of the other tables at no more "
        "bytes, under their own protocols (named in the notes column); 'no single-method row' means "
        "nothing else in RESULTS.md is that small.",
    ],
    "neural": [
        "Every row at a budget shares one frame: the tied embedding by RTN with one scale per row "
        "(4-bit at 2 bpw, 3-bit at 1, 2-bit at 0.5) or factorized at 0.25 (factor_embedding: rank 32, "
        "4-bit codes, about 0.06 bpw), norms float16; the block linears get the rest. "
        "svd: one rank for all 210 matrices, the largest that fits; + distill: the same factors trained "
        "by distillation (KL + per-block output matching + activation stability, 600 steps of 8 x 512 "
        "calibration tokens, AdamW lr 1e-4): the ablation without a hypernetwork; hypernet: the "
        "generator (GRU backbone over depth, coordinate-embedded heads; the widest of 256/128/64 that "
        "fits rank 16 or more, at the largest rank that fits), Set Transformer warm start (300 steps) "
        "then the same distillation (lr 1e-3); hypernet8: the same with its matrices stored as 8-bit "
        "codes (twice the parameters); dit: the diffusion transformer head (2 adaLN-Zero blocks, 4 "
        "DDIM steps from a seeded x_1) instead of the MLP head, 100 + 200 steps to fit one 10-minute "
        "call; kan: 2 levels of row/column codes into a B-spline KAN, weight reconstruction only (15 "
        "Adam steps per level); residual: GPTQ 2-bit rows plus a 0.05 bpw generator trained on what "
        "GPTQ leaves.",
        "GPU min is compress time on the H100 (training included); decompress s is the time the "
        "artifact's generator takes to regenerate every weight on load (CPU). The interpolation and "
        "noise rows use the first 64 windows only; z_B = z_A + E(W_B) - E(W_A) with E the warm "
        "start's Set Transformer and B a 60-step fine-tune of the teacher on the calibration text.",
        "Reading: at 1 and 0.5 bpw the hypernetwork beats plain SVD (by 15 and 27 orders of "
        "magnitude of perplexity) and also the same storage of SVD factors trained by the same "
        "distillation (2067 vs 3132, 4537 vs 9046). At 0.25 bpw (0.237, rank 24) it trains but loses "
        "to the distilled SVD factors (2858 vs 2377). Larger generators do worse at the same 600 "
        "steps: rank 256 at 2 bpw gives 6536 (rank 64 at 1 bpw: 2067), 8-bit values with rank 128 "
        "at 1 bpw 9734, and width 512 at lr 1e-3 diverged (KL 17.8); training length, not storage, "
        "limits the hypernetwork here. The DiT head at 1 bpw with a third of the steps reaches 8570. "
        "KAN weight fitting does not give a working model at 1 bpw (a 500-step batched run in an "
        "earlier session measured 2.6e12, worse than 15 steps: lower weight error is not lower KL); "
        "at 0.5 bpw no KAN of 2 levels fits beside the frame. The interpolation path is flat: the "
        "encoder maps the fine-tuned checkpoint to nearly the same latents, so the generated model "
        "does not follow B.",
    ],
}


def _ct_layout(data: dict) -> list[str]:
    from ct_layout import report_section

    return report_section(data)


def _lm_eval_tasks(data: dict) -> list[str]:
    from lm_eval_tasks import report_section

    return report_section(data)


def _fuzz(data: dict) -> list[str]:
    """results/fuzz.json (tests/artifact_fuzz.py): the strict reader against corrupted artifacts."""
    verdicts = ["refused", "accepted_same", "accepted_resealed_change", "crash", "hang", "memory",
                "inconsistent", "silent_change"]
    env = data["environment"]
    lines = ["## Artifact fuzzing: corrupt and tampered artifacts against `load` and `inspect`", "",
             f"- protocol: {data['variants']} variants (seed {data['seed']}) of {len(data['artifacts'])} tiny "
             f"artifacts ({', '.join(data['artifacts'])}), one mutation each, {data['resealed']} of them "
             "resealed (hashes and size recomputed); each loaded and inspected in one process "
             "(30 s alarm per call, peak RSS growth > 1 GiB counts as a blow-up)",
             f"- machine: {env['cpus']} CPUs, Python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}; commit {env['commit']}; {data['seconds']} s",
             f"- command: `python tests/artifact_fuzz.py --variants {data['variants']} --seed {data['seed']} "
             "--json benchmarks/results/fuzz.json`",
             "- accepted_same: loads with the saved logits (an unread file added, a no-op edit); "
             "accepted_resealed_change: a resealed, structurally valid edit of values (the format cannot "
             "tell it from an original); every other accepted edit would be a bad verdict", ""]
    lines += ["| mutation | " + " | ".join(verdicts) + " |", "|---|" + "---|" * len(verdicts)]
    rows = {**data["by_mutation"], "all": data["counts"]}
    lines += [f"| {m} | " + " | ".join(str(c.get(v, 0)) for v in verdicts) + " |" for m, c in rows.items()]
    return lines + [""]


def _frontier(data: dict) -> list[str]:
    from frontier_report import frontier_section

    return frontier_section(data)


def _grids(data: dict) -> list[str]:
    from frontier_report import grids_section

    return grids_section(data)


def _hypernet_depth(data: dict) -> list[str]:
    from hypernet_depth import report_section

    return report_section(data)


def _qat_lr(data: dict) -> list[str]:
    from frontier_report import qat_lr_section

    return qat_lr_section(data)


def _parallel_calibration(data: dict) -> list[str]:
    """benchmarks/parallel_calibration.py: one process against several, the same command."""
    lines = [f"## {data['title']}", "", f"- protocol: {data['protocol']}", f"- machine: {data['machine']}",
             f"- command: `{data['script']}` -> `benchmarks/results/parallel_calibration.json`", "",
             "| run | wall s | GPTQ stage s | processes that split the batches | notes | command |",
             "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['label']} | {row['wall_seconds']:.1f} | {row['stage_seconds']:.1f} | "
                     f"{row['calibration_processes']} | {row.get('notes', '')} | `{row['command']}` |")
    return [*lines, ""]


def _sharded_training(data: dict) -> list[str]:
    """benchmarks/sharded_training.py: recovery training replicated against sharded (FSDP2)."""
    lines = ["## Recovery training across processes: replicated (ddp) and sharded (FSDP2)", "",
             f"- machine: {data['machine']}",
             f"- command: `{data['command']}` (each row adds `--set qat.sharding=MODE`, under torchrun for "
             "several processes) -> `benchmarks/results/sharded_training.json`",
             "- end-to-end tokens/s: the qat end-to-end loop's; peak GPU memory: each process's by the end of that loop "
             "(every phase before it included); "
             "perplexity: the summary's (--eval, its windows); artifact gap: against the one-process row; the "
             "first row writes the teacher's corpus, the later rows read it from the cache; a one-process "
             "group runs the sharded code path with nothing to shard (what the path costs on its own)", "",
             "| run | wall s | corpus s | Block-AP s | end-to-end s | tokens | tok/s | peak GPU GiB | ppl | "
             "codes differing | max float gap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['row']} | {r['wall_seconds']:.0f} | {r['corpus_seconds']:.1f} | {r['block_ap_seconds']:.1f} | "
                     f"{r['end_to_end_seconds']:.1f} | {r['tokens']:,} | {r['tokens_per_second']:,.0f} | "
                     f"{_cell(r, 'peak_gpu_gib', '{:.2f}')} | {_cell(r, 'perplexity', '{:.3f}')} | "
                     f"{r['codes_differing']:.2%} | {r['max_float_difference']:.2g} |")
    return [*lines, ""]


def _sharded_training_step(data: dict) -> list[str]:
    """benchmarks/sharded_training.py step: qat's end-to-end step replicated and sharded."""
    lines = ["## qat's end-to-end step, replicated and sharded (FSDP2) on one process", "",
             f"- machine: {data['machine']}", f"- command: `{data['command']}` -> "
             "`benchmarks/results/sharded_training_step.json`",
             "- protocol: SmolLM2-135M-shaped random Llama, every linear fake-quantized at 3 bits group 64, norms "
             "trained, windows of 512 tokens, the engine's defaults (bf16 autocast and compiled blocks on CUDA); "
             "tokens/s over the steps after the first (which compiles); the sharded row runs the FSDP2 path in a "
             "one-process group, where there is nothing to shard: what the path itself costs", "",
             "| run | steps | first step s | step s | tok/s | peak GPU GiB |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['row']} | {r['steps']} | {r['first_step_seconds']:.2f} | {r['step_seconds']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} | {_cell(r, 'peak_gpu_gib', '{:.2f}')} |")
    return [*lines, ""]


def _analysis(data: dict) -> list[str]:
    """The analyze headline (benchmarks/analyze_demo.py)."""
    lines = [f"## {data['title']}", "", f"- protocol: {data['protocol']}", f"- machine: {data['machine']}",
             f"- command: `{data['command']}` -> `benchmarks/results/analysis.json`",
             f"- wall time: {data['wall_seconds']:.0f} s (model load included); seconds per section: "
             + ", ".join(f"{k} {v}" for k, v in data["seconds"].items()), "",
             "| finding | value |", "|---|---|",
             f"| layers with weight statistics | {data['layers']} |"]
    for method, e in data["excess_bits"].items():
        lines.append(f"| {method}: bits per weight above the Gaussian rate-distortion bound ({e['points']} points, "
                     f"{data['rd_layers']} layers) | {e['min']:+.2f} to {e['max']:+.2f} |")
    for key in ("least_influential", "most_influential"):
        if data.get(key):
            lines.append(f"| {key.replace('_', ' ')} block (1 - cos in/out) | {data[key]['block']} "
                         f"({data[key]['influence']:.4f}) |")
    for key, r in data["rotation"].items():
        lines.append(f"| rotation, kurtosis of the {key} | {r['kurtosis_before']:.2f} -> {r['kurtosis_after']:.2f} |")
    p = data["permutation"]
    if p["pairs"]:
        lines.append(f"| MLP weight matching, mean cosine of matched neurons over {p['pairs']} block pairs | "
                     f"{p['cosine']:.4f} as is -> {p['aligned']:.4f} aligned |")
    t = data.get("topology")
    if t:
        lines.append(f"| persistent homology, block {t['block']} MLP ({t['points']} tokens) | H0 {t['h0_bars']}, "
                     f"H1 {t['h1_bars']} bars longer than {t['threshold']}; {t['seconds']} s |")
    return lines + [""]


def _edit(data: dict) -> list[str]:
    """The concept-edit table (benchmarks/edit_demo.py): one before column, one after column per method."""
    from hypercompress.analysis.edit_report import summary_rows

    runs = data["runs"]
    tables = [summary_rows(run["report"]) for run in runs]
    first = runs[0]["report"]
    lines = [f"## {data['title']}", "",
             f"- model: {data['model']}; data: {data['pairs']} sentence pairs of the WikiText-2 validation text "
             "(numbers spelled out by num2words = concept, the same sentences with digits = contrast); unrelated text: validation sentences without digits (the KL budget); heldout text: "
             "test sentences without digits (never seen by the edit, measured only)",
             f"- protocol: {first['protocol']}",
             f"- machine: {data['machine']}",
             f"- command: `{data['command']}` -> `benchmarks/results/edit.json`", ""]
    for run in runs:
        r = run["report"]
        where = ", ".join(f"{s['label']}" for s in r["steps"]) or "none"
        lines.append(f"- {run['method']}: {len(r['steps'])} direction(s) erased (fitted at: {where}); "
                     f"stopped: {r['stopped']}; {r['seconds']:.0f} s")
    lines += ["", "| metric | before | " + " | ".join(f"after {run['method']}" for run in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    for index, (metric, before, _) in enumerate(tables[0]):
        lines.append(f"| {metric} | {before} | " + " | ".join(t[index][2] for t in tables) + " |")
    return lines + [""]


def _scale(data: dict) -> list[str]:
    from scale import section

    return section(data)


def _frontier_cli(data: dict) -> list[str]:
    from frontier_cli import section

    return section(data)


def _recovery_data(data: dict) -> list[str]:
    from recovery_data import section

    return section(data)


def _code_growth(data: dict) -> list[str]:
    from code_growth import section

    return section(data)


def _corpus_speed(data: dict) -> list[str]:
    from corpus_speed import section

    return section(data)


def _llamacpp_families(data: dict) -> list[str]:
    from llamacpp_families import section

    return section(data)


def _training_engine(data: dict) -> list[str]:
    """benchmarks/train_speed.py tables and the CLI run of recipes/gptq-w3g64-qat-1min.yaml."""
    parts = [f"## {data['title']}", "", f"- card: {data['card']}", ""]
    for block in data["speed"]:
        parts += [f"### {block['model']}", "", f"- command: `{block['command']}`",
                  f"- made: commit {block.get('commit', 'n/a')}, {block.get('date', 'n/a')}, torch {block.get('torch', 'n/a')}",
                  "- tok/s: over the steps after the first (which compiles); GiB per billion: peak GPU memory / "
                  "the model's parameters", "",
                  "| setting | tok/s | tokens seen | loop s (compiling included) | compiled graphs | final KL | peak GPU GiB "
                  "| GiB per billion params |", "|---|---|---|---|---|---|---|---|"]
        for label, row in block["rows"].items():
            if "error" in row:
                parts.append(f"| {label} | error: {row['error']} | | | | | | |")
                continue
            graphs = "n/a" if "graphs" not in row else f"{row['graphs']}" + (
                " (past the recompile limit: the rest eager)" if row.get("past_recompile_limit") else "")
            parts.append(f"| {label} | {row['tokens_per_second']:,.0f} | {row['tokens']:,} | {row['seconds']:.1f} | {graphs} | "
                         f"{row['final_kl']:.4f} | {row['peak_gpu_bytes'] / 2**30:.1f} | {row['gib_per_billion_params']:.1f} |")
        parts.append("")
    run = data["run"]
    qat = next(s["training"] for s in run["stages"] if s.get("training"))
    e2e, ev = qat["end_to_end"], run["evaluation_first_64"]
    parts += ["### The real model through the CLI", "", f"- command: `{run['command']}`",
              f"- protocol: {ev['protocol']}", "",
              "| stored bpw | ppl (first 64) | KL | top-1 | end-to-end tokens | tok/s | stopped by time | corpus s "
              "| Block-AP s | compress wall s |", "|---|---|---|---|---|---|---|---|---|---|",
              f"| {run['bits_per_weight']:.3f} | {ev['ppl']:.2f} | {ev['kl']:.4f} | {ev['top1']:.4f} | {e2e['tokens']:,} | "
              f"{e2e['tokens_per_second']:,.0f} | {e2e['stopped_by_time']} | {qat.get('corpus_seconds', 'n/a')} | "
              f"{qat['block_ap_seconds']} | {run['wall_seconds']:.0f} |", ""]
    return parts


SECTIONS = {"code_growth": _code_growth, "llamacpp_families": _llamacpp_families, "frontier_cli": _frontier_cli, "recovery_data": _recovery_data, "corpus_speed": _corpus_speed, "training_engine": _training_engine, "scale": _scale, "analysis": _analysis, "edit": _edit, "ct_layout": _ct_layout, "fuzz": _fuzz,
            "frontier": _frontier, "grids": _grids, "qat_lr": _qat_lr, "hypernet_depth": _hypernet_depth,
            "lm_eval_tasks": _lm_eval_tasks, "parallel_calibration": _parallel_calibration,
            "sharded_training": _sharded_training, "sharded_training_step": _sharded_training_step}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "peak_memory_gib" and row.get("peak_memory_bytes") is not None:
        value = row["peak_memory_bytes"] / 2**30
    return "n/a" if value is None else fmt.format(value)


def _kernel_tune(data: dict, family: str) -> list[str]:
    """benchmarks/kernel_tune.py run + merge: the picked tiles, the crossover and the preference."""
    out = [f"## Triton kernel tuning: {family}", "",
           f"- machine: {data['machine']}, torch {data['torch']}, triton {data['triton']}",
           f"- command: `{data['command']}` then `python benchmarks/kernel_tune.py merge FILE` -> "
           f"`src/hypercompress/kernels/triton_configs.json`, `benchmarks/results/kernel_tune_{family}.json`",
           "- protocol: random codes with integer zeros, group 128 (large: 11008 x 4096 and 4096 x 11008) or 64 "
           "(small: 1536 x 576 and 576 x 1536), bfloat16 x; CUDA graph of 20 calls, median of 3 replays; us is "
           "per shape (the two shapes of a size)",
           "- crossover (tokens up to which the fused kernel runs; above: dequantize + GEMM): "
           + ", ".join(f"{k} {v}" for k, v in data["gemm_rows"].items()),
           "- preference measured (our summed time over 1, 4 and 16 tokens at most the replaced path's): "
           + ", ".join(f"{k} {v}" for k, v in data["prefer"].items()),
           "- preference shipped (also checked against the float32 reference on the GPU): "
           + (", ".join(f"{k} {v}" for k, v in (data.get("prefer_verified") or {}).items())
              or "none (this run predates the check: every layer keeps the path it had)"), "",
           "| bits | size | tokens | us (two shapes) | config |", "|---|---|---|---|---|"]
    for r in data["best"]:
        c = r["config"]
        tile = (f"{'tensor cores' if c['USE_DOT'] else 'CUDA cores'}, "
                f"{'interleaved' if c['INTERLEAVE'] else 'position-wise'}{', group sum' if c['GROUPSUM'] else ''}, "
                f"M {c['BLOCK_M']} N {c['BLOCK_N']} K {c['BLOCK_K']}, split {c['SPLIT_K']}, "
                f"{c['num_warps']} warps, {c['num_stages']} stages")
        out.append(f"| {r['bits']} | {r['size']} | {r['tokens']} | {' / '.join(f'{u:.1f}' for u in r['us'])} | {tile} |")
    out += ["", "| bits | size | tokens | fused kernel us | dequantize + GEMM us |", "|---|---|---|---|---|"]
    out += [f"| {r['bits']} | {r['size']} | {r['tokens']} | {r['kernel_us']:.1f} | {r['dequantize_gemm_us']:.1f} |"
            for r in data["crossover"]]
    out += ["", "| bits | size | tokens | ours us (both shapes) | replaced us | replaced |", "|---|---|---|---|---|---|"]
    out += [f"| {r['bits']} | {r['size']} | {r['tokens']} | {r['ours_us']:.1f} | {r['replaced_us']:.1f} | {r['replaced']} |"
            for r in data["baselines"]]
    return out + [""]


def render_text() -> str:
    """RESULTS.md's text from every results/*.json (a section's renderer raising is a bug: tests run this)."""
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; "
             "each section names the script that produced it. Never edited by hand.", ""]
    for path in sorted((ROOT / "results").glob("*.json")):
        data = json.loads(path.read_text())
        if path.stem in SECTIONS:  # a result of its own shape, rendered by its script's module
            parts += SECTIONS[path.stem](data)
            continue
        if path.stem.startswith("kernel_tune_"):  # benchmarks/kernel_tune.py merge, one per GPU family
            parts += _kernel_tune(data, path.stem[len("kernel_tune_"):])
            continue
        if data.get("kind") == "speed":  # its own tables (benchmarks/speed_report.py)
            from speed_report import speed_section

            parts += [f"## {data['title']}", "", *speed_section(data, path.stem),
                      *[f"- note: {n}" for n in NOTES.get(path.stem, [])], ""]
            continue
        parts += [f"## {data['title']}", "",
                  f"- model: {data['model']} ({data['params']:,} parameters)",
                  f"- protocol: {data['protocol']}",
                  "- bpw: model.safetensors bytes x 8 / original parameters (embeddings, norms, "
                  "lm_head included; tied weights once); each row is reloaded from its artifact before evaluation",
                  f"- machine: {data['machine']}",
                  f"- command: `{data['script']}` -> `benchmarks/results/{path.name}`",
                  *[f"- note: {n}" for n in NOTES.get(path.stem, [])], "",
                  ]
        columns = [c for c in COLUMNS if any(_cell(r, c[0], c[2]) != "n/a" for r in data["rows"])]
        parts += ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
        parts += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in data["rows"]]
        parts.append("")
    return "\n".join(parts)


def render() -> Path:
    out = ROOT / "RESULTS.md"
    out.write_text(render_text())
    return out


if __name__ == "__main__":
    print(render())
