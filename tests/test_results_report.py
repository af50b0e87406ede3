"""benchmarks/RESULTS.md is generated: every committed result renders, and the file is what report.py makes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_is_rendered_from_the_committed_results():
    script = ("import sys; sys.path.insert(0, 'benchmarks'); import report; "
              "sys.stdout.write(report.render_text())")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (ROOT / "benchmarks" / "RESULTS.md").read_text(), \
        "benchmarks/RESULTS.md differs from its results: run python benchmarks/report.py"
