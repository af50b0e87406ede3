"""Progress on stderr that works in a terminal and in a log.

A terminal gets one rich bar per section (transient). A pipe, a file or a CI log gets lines:

    [   42 s] stage 1: gptq ×5 (w3g64, w4g64): 12/30 (40%) | 31 s in this step, about 47 s left

one when a section starts, when it ends, and at least every `every` seconds while it runs, also
when the library does not call back for a long time (one GPTQ block of a large model, a model
loading): a heartbeat thread repeats the last state. The library's callback protocol is in
hypercompress.progress.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

LINE_EVERY = 10.0  # seconds between lines in a log while a section runs


def process_seconds(fallback_start: float) -> float:
    """Wall seconds since this process started (Linux: /proc/self/stat against /proc/uptime, so
    the interpreter's own start and every import count); elsewhere since `fallback_start`
    (a time.perf_counter() value taken early)."""
    try:
        import os

        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot
        uptime = float(open("/proc/uptime").read().split()[0])
        if 0 <= uptime - started < 10 * 86400:
            return uptime - started
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return time.perf_counter() - fallback_start


class LineProgress:
    """progress(section, done, total, note) as lines on `stream`; `tick()` writes the running
    section's line if `every` seconds passed since the last line (the heartbeat calls it).
    `clock` is time.monotonic unless a test passes a fake one."""

    def __init__(self, stream: TextIO, every: float = LINE_EVERY, clock: Callable[[], float] = time.monotonic):
        self.stream, self.every, self.clock = stream, every, clock
        self.start = self.last_line = clock()
        self.section: str | None = None
        self.section_start = self.start
        self.done = self.total = self.first_done = 0
        self.done_at = self.start
        self.note = ""
        self.lock = threading.Lock()

    def __call__(self, section: str, done: int, total: int, note: str = "") -> None:
        with self.lock:
            now = self.clock()
            new = section != self.section or total != self.total  # a new step, or a new phase of it
            if new:                                                  # (qat: blocks, then steps)
                self.section, self.section_start, self.first_done = section, now, done
            if new or done != self.done:
                self.done_at = now
            finished = total > 0 and done >= total and (new or done != self.done)
            self.done, self.total, self.note = done, total, note
            if new or finished or now - self.last_line >= self.every:
                self._write(now)

    def tick(self) -> None:
        with self.lock:
            now = self.clock()
            if self.section is not None and now - self.last_line >= self.every:
                self._write(now, heartbeat=True)

    def _write(self, now: float, heartbeat: bool = False) -> None:
        self.last_line = now
        ended = self.total > 0 and self.done >= self.total
        text = f"[{now - self.start:6.0f} s] still working after '{self.section}'" if heartbeat and ended \
            else self.line(now)
        self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, now: float) -> str:
        """'[elapsed] section: done/total (pct) | seconds in this step, estimate | note'."""
        spent = now - self.section_start
        parts = [f"[{now - self.start:6.0f} s] {self.section}"]
        if self.total > 1:
            parts[0] += f": {self.done}/{self.total} ({self.done / self.total:.0%})"
        elif self.done >= self.total > 0:
            parts[0] += ": done"
        timing = f"{spent:.0f} s in this step"
        if self.first_done < self.done < self.total:  # units done in this run (a resumed step's count from where it was)
            per_unit = (self.done_at - self.section_start) / (self.done - self.first_done)
            left = max(0.0, per_unit * (self.total - self.done) - (now - self.done_at))
            timing += f", about {_duration(left)} left"
        parts.append(timing)
        if self.note:
            parts.append(self.note)
        return " | ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def heartbeat(lines: LineProgress) -> Iterator[None]:
    """Call lines.tick() every second in a daemon thread until the block ends."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(1.0):
            lines.tick()

    thread = threading.Thread(target=beat, name="hypercompress-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)


@contextmanager
def show_progress(stream: TextIO | None = None) -> Iterator[Callable[..., None]]:
    """Yields progress(section, done, total, note=""): rich bars when `stream` (stderr) is a
    terminal, LineProgress lines with a heartbeat otherwise; nothing in a launcher's processes
    other than the first (process 0's lines say where the run is)."""
    from ..parallel import launched_rank

    if launched_rank() > 0:
        yield lambda *args, **kwargs: None
        return
    stream = stream or sys.stderr
    if not stream.isatty():
        lines = LineProgress(stream)
        with heartbeat(lines):
            yield lines
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    console = Console(file=stream, markup=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=console,
                  transient=True) as bar:
        tasks: dict[str, object] = {}

        def update(section: str, done: int, total: int, note: str = "") -> None:
            if section not in tasks:
                tasks[section] = bar.add_task(section, total=total, note=note)
            bar.update(tasks[section], completed=done, total=total, note=note)

        yield update


def print_time_table(console, timeline: list[dict], startup: float) -> None:
    """Where a run's wall time went on `console` (a rich Console): `startup` seconds (the
    interpreter, imports, option checks) before the library was called, then every step of its
    `timeline` ([{"step", "seconds"}], hypercompress.progress.Timeline.rows); rows add up to the total."""
    from rich.table import Table

    rows = [("start-up (python, imports, options)", startup)]
    rows += [(row["step"], row["seconds"]) for row in timeline]
    total = sum(seconds for _, seconds in rows)
    table = Table(title="where the time went (wall seconds)")
    for column in ("step", "seconds", "share"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step, seconds in rows:
        table.add_row(step, f"{seconds:.1f}", f"{seconds / total:.0%}" if total else "-")
    table.add_row("total", f"{total:.1f}", "100%")
    console.print(table)
