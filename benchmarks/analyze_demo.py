"""`hypercompress analyze` on SmolLM2-135M: the headline numbers of its report, and the time it takes.

    python benchmarks/analyze_demo.py --model smollm2-135m    # -> results/analysis.json + RESULTS.md

Runs the command as a user would (calibration: the WikiText-2 validation text, 8 windows of 256
tokens, seed 0, float32 on the CPU) into a temporary folder and keeps the report's headline numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, machine, write_json  # noqa: E402


def headline(result: dict) -> dict:
    """The numbers RESULTS.md shows, from analysis.json."""
    excess = {}
    for layer, data in result["rate_distortion"].items():
        for point in data["points"]:
            excess.setdefault(point["method"], []).append(point["excess_bits"])
    flow = [r for r in result["flow"] if r["influence"] is not None]
    rotation = (result.get("symmetry") or {}).get("rotation") or {}
    perm = (result.get("symmetry") or {}).get("permutation") or []
    return {
        "protocol": result["protocol"].replace(str(CALIB_TEXT), "../shared/data/" + CALIB_TEXT.name), "seconds": result["seconds"], "layers": len(result["weights"]),
        "rd_layers": len(result["rate_distortion"]),
        "excess_bits": {m: {"min": min(v), "max": max(v), "points": len(v)} for m, v in excess.items()},
        "least_influential": min(flow, key=lambda r: r["influence"]) if flow else None,
        "most_influential": max(flow, key=lambda r: r["influence"]) if flow else None,
        "rotation": {k: {"kurtosis_before": v["before"]["kurtosis"], "kurtosis_after": v["after"]["kurtosis"]}
                     for k, v in rotation.items()},
        "permutation": {"pairs": len(perm), "cosine": sum(p["cosine"] for p in perm) / max(len(perm), 1),
                        "aligned": sum(p["aligned"] for p in perm) / max(len(perm), 1)},
        "topology": result.get("topology"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        tick = time.perf_counter()
        subprocess.run(["hypercompress", "analyze", args.model, "--calib", str(CALIB_TEXT), "--out", str(out),
                        "--device", args.device], check=True)
        wall = time.perf_counter() - tick
        result = json.loads((out / "analysis.json").read_text())
    write_json("analysis", {"title": f"Analysis report of {args.model} (`hypercompress analyze`)",
                            "model": args.model, "machine": machine(), "wall_seconds": round(wall, 1),
                            "command": f"python benchmarks/analyze_demo.py --model {args.model} --device {args.device}",
                            **headline(result)})
    from report import render

    render()


if __name__ == "__main__":
    main()
