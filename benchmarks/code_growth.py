"""How much larger GPTQ's codes code than RTN's under the lossless stage (planning/size_table.py's
GPTQ_CODE_GROWTH): SmolLM2-135M, every block linear at one option (the embedding RTN 4-bit rows in
both), the size table's RTN prediction against the file of GPTQ codes (act_order, damp 0.01, the
Hessians on `--windows` calibration windows of 512 tokens: 32 as compress draws by default), zstd 10. Per option: the
whole file's ratio and the linears' own (the file's extra bytes over the linears' RTN bytes), which
planning/size_table.GPTQ_CODE_GROWTH holds.

    python benchmarks/code_growth.py --windows 32 --json benchmarks/results/code_growth.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, machine  # noqa: E402

from hypercompress.storage.artifact import stored_bytes  # noqa: E402
from hypercompress.sources.data import calibration_samples, read_text, tokenize  # noqa: E402
from hypercompress.sources.models import load_model  # noqa: E402
from hypercompress.planning.mixed_bits import MixedBitsPlanner, Plan  # noqa: E402
from hypercompress.planning.size_table import SizeTable  # noqa: E402
from hypercompress.planning.trials import shared_gptq, trial_model  # noqa: E402

OPTIONS = ((2, -1), (2, 64), (3, -1), (3, 64), (4, -1), (4, 64), (8, -1))
LEVEL = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    model = loaded.model
    samples = calibration_samples(tokenize(loaded.tokenizer, read_text(CALIB_TEXT)), args.windows, 512, 0)
    planner = MixedBitsPlanner(model, samples[:1, :256], 64)
    table = SizeTable(model, planner.candidates, LEVEL)
    linears = [n for n in planner.candidates if n != planner.embedding]
    tick = time.perf_counter()
    solved = shared_gptq(model, {(n, o) for n in linears for o in OPTIONS}, samples)
    rows = []
    for option in OPTIONS:
        allocation = {**{n: option for n in linears}, planner.embedding: (4, -1)}
        plan = Plan(allocation, {}, 0, planner.params)
        rtn = table.file_bytes(allocation)
        # the linears' own RTN bytes: what the size table grows by the option's allowance
        rtn_linears = sum(t.nbytes for n in linears for t in table.entries[(n, option)])
        gptq = stored_bytes(trial_model(model, plan, planner.embedding, solved), LEVEL)
        linear_growth = 1 + (gptq - rtn) / rtn_linears
        rows.append({"option": list(option), "rtn_bytes": rtn, "gptq_bytes": gptq, "gptq_over_rtn": gptq / rtn,
                     "rtn_linear_bytes": rtn_linears, "linear_growth": linear_growth})
        print(f"w{option[0]}{'row' if option[1] == -1 else f'g{option[1]}'}: RTN {rtn:,} B, GPTQ {gptq:,} B, "
              f"GPTQ / RTN {gptq / rtn:.5f} (the linears' own bytes: {linear_growth:.5f})", flush=True)
    print(f"{time.perf_counter() - tick:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"title": TITLE, "windows": args.windows, "level": LEVEL, "machine": machine(),
                                         "rows": rows}, indent=2) + "\n")


TITLE = "How much larger GPTQ's codes code than RTN's under the lossless stage (the planner's GPTQ_CODE_GROWTH)"


def section(data: dict) -> list[str]:
    """RESULTS.md rows of benchmarks/results/code_growth.json."""
    parts = [f"## {data['title']}", "",
             f"- command: `python benchmarks/code_growth.py --windows {data['windows']} --json "
             "benchmarks/results/code_growth.json` (SmolLM2-135M, every block linear at one option, the embedding "
             f"RTN 4-bit rows; zstd {data['level']})", f"- machine: {data['machine']}",
             "- linears' growth: (GPTQ file - RTN file) / the linears' RTN bytes + 1; planning/size_table.py "
             "holds these rounded up to the next 0.1 point", "",
             "| option | RTN file B | GPTQ file B | file ratio | linears' growth |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        bits, group = r["option"]
        parts.append(f"| w{bits}{'row' if group == -1 else f'g{group}'} | {r['rtn_bytes']:,} | {r['gptq_bytes']:,} | "
                     f"{r['gptq_over_rtn']:.5f} | {r['linear_growth']:.5f} |")
    return parts + [""]


if __name__ == "__main__":
    main()
