"""Where the shared data lies: ../shared/data beside the repository (CI has it too)."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_TEXT = DATA / "wikitext2_test.txt"
CALIB_TEXT = DATA / "wikitext2_valid_tokenized.txt"
