"""Where a run's wall time goes: the library's progress protocol and a timeline of its steps.

Every long step of the library reports through one callback, `progress(section, done, total, note)`:
`section` names the step (stable while it runs: "planning: sensitivity (RTN, KL per module and
option)", "stage 1: gptq ×5 (w3g64, w4g64, ...)"), `done` / `total` count its units (blocks, trials,
windows; total 1 for a step that cannot be counted), `note` says what is happening inside it (a
loss, the trial's label) and may change at every call. The CLI draws it (cli/progress.py: bars on
a terminal, a line every few seconds in a log); a Python caller may pass any such function.

`Timeline` turns the sections into contiguous wall-clock spans, so its rows add up to the run's
wall time exactly (workflow.compress reports them as summary["timeline"]).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Protocol


class Progress(Protocol):
    def __call__(self, section: str, done: int, total: int, note: str = "") -> None: ...


def no_progress(section: str, done: int, total: int, note: str = "") -> None:
    """The callback used when the caller turns progress off (progress=False)."""


class Bars:
    """The Python API's default progress: a tqdm bar per step on stderr (a notebook widget where
    ipywidgets is installed), labelled with its section, counting its units, the note beside it.
    A bar closes when its step ends (done == total) or the next step begins, so every step leaves
    its final line. TQDM_DISABLE=1 silences it, as it does every tqdm bar."""

    def __init__(self) -> None:
        self._bar = None
        self._section: str | None = None

    def __call__(self, section: str, done: int, total: int, note: str = "") -> None:
        if section != self._section or self._bar is None:
            self.close()
            self._section, self._bar = section, _tqdm()(total=max(total, 1), desc=section, unit="",
                                                       dynamic_ncols=True, leave=True)
        bar = self._bar
        if total != bar.total:
            bar.total = max(total, 1)
        if note:
            bar.set_postfix_str(note, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tqdm():
    """tqdm's notebook bar where it can draw one (ipywidgets), its text bar elsewhere (no warning)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


@contextmanager
def library_bars_off(progress: "Progress | bool | None"):
    """transformers' own bars (weights loading, GGUF dequantization) off while a library call draws
    its default bars or none (`progress` None, True or False), back as they were afterwards; a
    caller's own progress function leaves them as the caller set them (the CLI: --verbose)."""
    if callable(progress) and progress is not True:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


def default_progress(progress: "Progress | bool | None") -> "Progress":
    """What a library call reports to: bars for None or True, nothing for False, else `progress`."""
    if progress is None or progress is True:
        return Bars()
    return no_progress if progress is False else progress


class Timeline:
    """Contiguous spans of wall time, one per step of a run.

    `mark(label)` ends the running step and starts `label` (a label met again, e.g. between two
    stages, adds to its row); `finish()` ends the last one. The rows cover every second from the
    Timeline's creation to `finish()`: rows() seconds sum to `wall_seconds` (up to rounding).
    `track(progress)` wraps a progress callback so that each new section is marked as it starts.
    `clock` (seconds, monotonic) is time.perf_counter unless a test passes a fake one."""

    def __init__(self, first: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = self._last = clock()
        self._label = first
        self._end: float | None = None
        self._seconds: dict[str, float] = {}

    def mark(self, label: str) -> None:
        now = self._clock()
        self._seconds[self._label] = self._seconds.get(self._label, 0.0) + now - self._last
        self._label, self._last = label, now

    def finish(self) -> None:
        if self._end is None:
            self.mark("")
            self._end = self._last
            self._seconds.pop("", None)

    def seconds_since(self, label: str) -> float:
        """Seconds spent in `label` so far (0 if it never ran)."""
        running = self._clock() - self._last if label == self._label and self._end is None else 0.0
        return self._seconds.get(label, 0.0) + running

    @property
    def wall_seconds(self) -> float:
        return (self._end if self._end is not None else self._clock()) - self._start

    def rows(self) -> list[dict[str, float | str]]:
        """[{"step": label, "seconds": s}] in the order the steps first ran (call finish() first)."""
        return [{"step": label, "seconds": round(s, 3)} for label, s in self._seconds.items()]

    def track(self, progress: Callable[..., None]) -> Progress:
        """`progress`, marking this timeline whenever the section changes (a callback that takes
        only (section, done, total) is called without the note)."""
        with_note = accepts_note(progress)

        def tracked(section: str, done: int, total: int, note: str = "") -> None:
            if section != self._label:
                self.mark(section)
            progress(section, done, total, note) if with_note else progress(section, done, total)

        return tracked


def accepts_note(progress: Callable[..., None]) -> bool:
    """Whether `progress` takes a fourth positional argument (the note)."""
    return takes_positional(progress, 4)


def takes_positional(function: Callable[..., None], count: int) -> bool:
    """Whether `function` can be called with `count` positional arguments."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it as documented
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= count or any(p.kind == p.VAR_POSITIONAL for p in parameters)
