"""When the command line started: the first module `hypercompress.cli` imports, so the time table's
start-up row (interpreter, imports, option checks) counts from here."""

from __future__ import annotations

import time

STARTED = time.perf_counter()
