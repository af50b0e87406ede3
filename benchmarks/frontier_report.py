"""RESULTS.md sections of frontier.py (results/frontier.json) and grids.py (results/grids.json)."""

from __future__ import annotations


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


FRONTIER_NOTES = [
    "Rows are what the runs produced, whatever they show. `target` names the size a row was built for; "
    "bpw is the file's (lossless stage 10 included), which can land under the target: 2-bit GPTQ codes "
    "are peaked, and zstd codes all-2-bit-rows SmolLM2 at 1.27 bpw.",
    "valid rise / domain rise: the NLL increase over the original on held-out validation windows (the "
    "calibration domain) and on the second domain (Python standard-library docstrings); gap = domain "
    "rise / valid rise (1.0: the loss is spread evenly; the issue asks for at most 1.5).",
    "planner rows: the plans `compress --target-bpw T --distill` made (`frontier.py run --plan-only` on a "
    "2-core Intel Xeon CPU, 128 calibration windows; 332 / 475 / 852 s for 4.0 / 3.0 / 2.5), compressed "
    "from the plan file (`--plan benchmarks/results/frontier-plans/measured/plan-T.json`). Their GPTQ "
    "trials (8 calibration windows, KL on 4 further validation windows), plan vs the uniform recipes that "
    "fit: 4.0: 0.228 vs 0.249 and 0.290; 3.0: 1.358 vs 1.808 and 2.321; 2.5: 2.966 vs 5.809 and 22.57; "
    "1.951 (2.0 is refused: the nearest plans store 1.951 and 2.033 bpw): 7.598 vs 8.697 and 13.12. The "
    "plan was kept at every target, and it beats the best uniform row at 3.0 and 2.5 bpw with GPTQ codes "
    "and after qat.",
    "qat's codes code 1.6-3.3% larger than the GPTQ codes they start from (the rows before / after qat), "
    "so the planner+qat files stored 1.7% and 1.9% over their targets. Plans with a qat stage are since fit "
    "to target / 1.035 (planner.QAT_CODE_GROWTH); the rows here predate it. The plans with that margin "
    "(benchmarks/results/frontier-plans/, the same CPU) keep the plan: 3.0: 1.865 vs 2.164 and 23.42; 2.5: "
    "3.825 vs 5.809 and 22.57; 4.0: 0.275 vs 0.354 and 0.392 (264 to 307 s each).",
    "qat rows: GPTQ (or the planner's codes), then qat: Block-AP 100 steps per block at 2e-4, then "
    "400 end-to-end steps of 8 windows (KL + 0.1 x hidden-state matching) on the 128 calibration windows "
    "plus 128 the original wrote itself, trained with TF32 matmuls, measured in float32. The learning "
    "rate was chosen on the held-out validation loss (never the test text): 1.5e-4 beat 5e-5 and 2e-5 at "
    "3 bits and 5e-5 at 4 bits, on the second domain too; it is now qat's default. Its test perplexity "
    "agrees at 2.5 bits (184.9 vs 1735 at 5e-5). A teacher-written share of 0.75 instead of 0.5 at 3 bits: "
    "held-out validation NLL 3.983 vs 3.941 (worse), second domain 3.887 vs 3.929 (better); chosen on the "
    "validation loss, 0.5 stays the default.",
    "GPU min: wall minutes of the row's own compression (the model's load and the measurements left "
    "out) with 2 to 6 such runs side by side on one H200 (benchmarks/frontier_batch.sh), so one run "
    "alone takes less (4.3 minutes with 2, 5.9 with 4 or 5).",
    "Not measured: the planner+qat rows at 4.0 and 1.951 bpw, uniform+qat at 2.0 bpw and rotate+qat "
    "(with six runs sharing the GPU they were cut at 9.4 minutes, during qat); longer qat (900 steps, cut "
    "at step 627). The rotated rows untie SmolLM2's head (one more table, +0.78 bpw), so they are not at "
    "equal bytes.",
]

GRIDS_NOTES = [
    "Reading: at 3 bits both non-uniform grids lose badly to the uniform asymmetric grid at about the "
    "same bits (95.6 vs 1066 and 1464): scaled by the group's absmax they have no offset, so a "
    "skewed group wastes levels, and a learned codebook (which minimizes the mean squared error of "
    "the normalized weights) moves its outer levels inwards and clips each group's largest weight. "
    "At 4 bits NormalFloat has a lower KL and a higher top-1 (0.263 vs 0.335, 0.723 vs 0.689) but a "
    "higher perplexity (39.90 vs 39.50) at 0.06 bpw less; the learned codebook at g48 (0.02 bpw "
    "more) is 39.34. No grid wins clearly at equal bytes, so none is kept as a stored kind: uniform "
    "codes keep every exporter and int4 kernel.",
]


def frontier_section(data: dict) -> list[str]:
    lines = [f"## {data['title']}", "",
             f"- model: {data['model']} ({data['params']:,} parameters)",
             f"- protocol: {data['protocol']}",
             "- bpw: model.safetensors bytes x 8 / original parameters, lossless stage (zstd 10) as size "
             "targets store; each row reloaded from its artifact",
             f"- machine: {data['machine']}",
             f"- command: `{data['script']}` -> `benchmarks/results/frontier.json`",
             *[f"- note: {n}" for n in FRONTIER_NOTES], "",
             "| row | bpw | ppl first 64 | ppl all | KL | top-1 | valid rise | domain rise | gap | GPU min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append("| " + " | ".join([
            r["label"], _num(r.get("bits_per_weight"), "{:.3f}"), _num(r.get("ppl_first64"), "{:.4g}"),
            _num(r.get("ppl"), "{:.4g}"), _num(r.get("kl"), "{:.3f}"), _num(r.get("top1"), "{:.3f}"),
            _num(r.get("valid_rise"), "{:+.1%}"), _num(r.get("domain_rise"), "{:+.1%}"),
            _num(r.get("domain_gap"), "{:.2f}x"), _num(r.get("gpu_minutes"), "{:.2f}")]) + " |")
    return lines + [""]


def grids_section(data: dict) -> list[str]:
    lines = [f"## {data['title']}", "",
             f"- model: {data['model']}; block linears only (the embedding stays float16)",
             f"- protocol: {data['protocol']}",
             f"- machine: {data['machine']}",
             f"- command: `{data['script']}` -> `benchmarks/results/grids.json`",
             *[f"- note: {n}" for n in GRIDS_NOTES], "",
             "| grid | block-linear bpw | perplexity | KL | top-1 |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['label']} | {r['linear_bpw']:.3f} | {r['ppl']:.4g} | {_num(r.get('kl'), '{:.3f}')} | "
                     f"{_num(r.get('top1'), '{:.3f}')} |")
    return lines + [""]


def qat_lr_section(data: dict) -> list[str]:
    best = min((r for r in data["rows"] if r["block_lr"]), key=lambda r: r["held_out_error"])
    lines = [f"## {data['title']}", "",
             f"- protocol: SmolLM2-135M block {data['block']}, w{data['bits']} g64 from RTN's grid, {data['steps']} "
             "Block-AP steps on 4 windows of 256 validation tokens (scales at 5x the rate); scored by the "
             "block's relative output error on 20 further validation windows (0: RTN, untrained)",
             f"- machine: {data['machine']}",
             f"- command: `{data['script']}` -> `benchmarks/results/qat_lr.json`",
             f"- note: lowest held-out error at block_lr {best['block_lr']:g}; the end-to-end rate is not swept yet", "",
             "| block_lr | held-out output error | seconds |", "|---|---|---|"]
    lines += [f"| {r['block_lr']:g} | {r['held_out_error']:.5f} | {r['seconds']} |" for r in data["rows"]]
    return lines + [""]
