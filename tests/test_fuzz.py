"""The artifact fuzzer (tests/artifact_fuzz.py) as a test: a few hundred corrupted or tampered variants
of tiny artifacts, judged in a subprocess (so a hang is a timeout here, not a stuck suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FUZZER = Path(__file__).resolve().parent / "artifact_fuzz.py"


def test_corrupt_and_tampered_artifacts_never_crash_hang_or_load_silently_changed(tmp_path):
    out = tmp_path / "fuzz.json"
    subprocess.run([sys.executable, str(FUZZER), "--variants", "300", "--seed", "0", "--json", str(out), "--rows"],
                   check=True, timeout=900, capture_output=True)
    result = json.loads(out.read_text())
    bad = [(r["verdict"], r["what"], r["load_detail"] or r["inspect_detail"]) for r in result["bad"]]
    assert bad == [], bad[:5]
    counts = result["counts"]
    assert sum(counts.values()) == 300
    assert counts.get("refused", 0) > 200  # the oracle saw real corruption, not 300 no-ops
    assert counts.get("accepted_same", 0) > 0  # and a harmless edit (an unread file) still loads
