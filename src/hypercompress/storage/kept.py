"""Evaluations kept with an artifact: `evaluations.json` beside its manifest, written by
`hypercompress evaluate ARTIFACT` (or `hypercompress.evaluate(..., keep=True)`), read by `inspect`
and `plot`.

The file is not in the manifest's hashed file list (an artifact is sealed when written; its
measurements come later), so the strict reader neither checks nor reads it and `load` is unaffected
by it. Anything may be in it, then: it is read defensively (a regular file of bounded size, JSON,
every row validated by a strict schema); a file that does not pass is one warning and ignored,
never an error, and rows that do not pass are dropped with one warning.

Format: {"format": "hypercompress-evaluations", "version": 1, "evaluations": [row, ...]}, a row per
protocol (KeptEvaluation: the protocol strings, data, teacher, windows, the numbers, task rows, the
date and the hypercompress version). A new evaluation with the same protocol replaces the older.
Writes are atomic (atomic.replace_file): a kill leaves the old file or the new one.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .reader import MANIFEST, read_document
from .atomic import replace_file
from ..errors import UserError

EVALUATIONS = "evaluations.json"
FORMAT = "hypercompress-evaluations"
MAX_BYTES = 4 << 20  # a row is ~1 KB (a few KB with task rows): room for thousands
MAX_ROWS = 1000
Warn = Callable[[str], None]
IGNORED = "ignored it (delete it, or evaluate again to rewrite it)"


def _number(low: float | None = None, high: float | None = None, above: float | None = None) -> Any:
    """A JSON number (int or float, never a bool or a string) that is finite and within the bounds."""
    def check(value: int | float) -> float:
        try:
            number = float(value)
        except OverflowError:  # an integer past float range
            raise ValueError("must be a finite number") from None
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        if (low is not None and number < low) or (high is not None and number > high) or \
                (above is not None and number <= above):
            raise ValueError("is out of range")
        return value

    return Annotated[int | float, AfterValidator(check)]


Number = _number()
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters: what is read here is printed on a terminal
Text = Annotated[str, Field(max_length=16384, pattern=PRINTABLE)]
Short = Annotated[str, Field(max_length=64, pattern=PRINTABLE)]
Count = Annotated[int, Field(ge=0, lt=1 << 62)]
Name = Annotated[str, Field(max_length=200, pattern=PRINTABLE)]
TaskRow = Annotated[dict[Name, Number | None], Field(max_length=64)]  # acc, acc_stderr, ..., docs


class KeptEvaluation(BaseModel):
    """One kept evaluation (a row of evaluations.json). Unknown keys (a newer hypercompress's) are
    ignored; known ones must have their type."""

    model_config = ConfigDict(strict=True, extra="ignore")
    protocol: Text | None = None          # the perplexity protocol (eval.perplexity.protocol_text)
    tasks_protocol: Text | None = None    # the lm-eval protocol (eval.harness.tasks_protocol)
    data: Text | None = None
    teacher: Text | None = None
    dtype: Short | None = None
    device: Short | None = None
    seq_len: Count | None = None
    windows: Count | None = None
    tokens: Count | None = None
    ppl: _number(above=0) | None = None
    nll: Number | None = None
    kl: Number | None = None
    top1: _number(0, 1) | None = None
    tokens_per_s: _number(0) | None = None
    tasks: Annotated[dict[Name, TaskRow], Field(max_length=256)] | None = None
    date: Short | None = None                  # ISO 8601, UTC
    hypercompress_version: Short | None = None

    @property
    def key(self) -> tuple[str | None, str | None]:
        """What makes two evaluations the same measurement: a newer one with this key replaces."""
        return self.protocol, self.tasks_protocol


class _KeptFile(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    format: str
    version: int
    evaluations: list[Any] = Field(max_length=MAX_ROWS)


def is_artifact_dir(model: Any) -> bool:
    """Whether `model` (a source string or path) names an artifact directory (it has a manifest)."""
    if not isinstance(model, (str, Path)):
        return False
    try:
        return (Path(model).expanduser() / MANIFEST).is_file()
    except (OSError, RuntimeError):
        return False


def row_of(result: Any) -> KeptEvaluation:
    """The row kept for an eval.evaluation.Evaluation, dated now (UTC), with this hypercompress's
    version; a number that is not finite is kept as null, a control character as a space (so that the
    row reads back). UserError for a result the format cannot hold."""
    fields = {key: _clean(getattr(result, key, None)) for key in KeptEvaluation.model_fields
              if key not in ("date", "hypercompress_version")}
    try:
        return KeptEvaluation(**fields, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              hypercompress_version=_version())
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise UserError(f"the result does not fit {EVALUATIONS} ({where}: {exc.errors()[0]['msg']})") from None


def _clean(value: Any) -> Any:
    """`value` with non-finite floats as None and control characters as spaces, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return re.sub(r"[\x00-\x1f\x7f]", " ", value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def read_kept(artifact: Path, warn: Warn, fix: str = IGNORED) -> list[KeptEvaluation]:
    """The evaluations kept in `artifact` (oldest first); [] when there are none. A file that cannot
    be read safely or is not this format is `warn`ed about (one line ending in `fix`) and ignored; so
    are the rows that do not validate (one line for all of them)."""
    file = Path(artifact) / EVALUATIONS
    if not file.exists() and not file.is_symlink():
        return []
    try:
        rows = _parse(file, fix)
    except UserError as exc:
        warn(str(exc))
        return []
    kept, bad = [], 0
    for row in rows:
        try:
            kept.append(KeptEvaluation.model_validate(row))
        except ValidationError:
            bad += 1
    if bad:
        warn(f"{file}: {bad} of {len(rows)} evaluations are malformed; ignored them")
    return kept


def _parse(file: Path, fix: str) -> list[Any]:
    """The raw rows of an evaluations file; UserError (ending in `fix`) for one that is not safely
    readable or not this format."""
    text = read_document(file, MAX_BYTES, fix=fix)  # a regular file, bounded before it is opened
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(f"{file} is not JSON; {fix}") from None
    try:
        parsed = _KeptFile.model_validate(data)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "the top level"
        raise UserError(f"{file} is not an evaluations file ({where}: {exc.errors()[0]['msg']}); "
                        f"{fix}") from None
    if parsed.format != FORMAT or parsed.version != 1:
        raise UserError(f"{file} is format {parsed.format[:40]!r} version {parsed.version}, not {FORMAT!r} 1; "
                        f"{fix}")
    return parsed.evaluations


def keep(artifact: Path, result: Any, warn: Warn) -> Path:
    """Add `result` (an Evaluation) to `artifact`'s evaluations.json, replacing a kept one with the
    same protocol; atomically (an unreadable file there is replaced, with a warning). Returns the
    file. Raises OSError when the folder cannot be written, UserError for a result the format cannot
    hold (the caller decides whether either is an error)."""
    file = Path(artifact) / EVALUATIONS
    row = row_of(result)
    earlier = read_kept(artifact, warn, fix="replacing it with this evaluation")
    rows = [r for r in earlier if r.key != row.key][-(MAX_ROWS - 1):]
    document = {"format": FORMAT, "version": 1,
                "evaluations": [r.model_dump(exclude_none=True) for r in [*rows, row]]}
    text = json.dumps(document, indent=2) + "\n"
    replace_file(file, lambda tmp: tmp.write_text(text))
    return file


def keep_or_warn(artifact: Path, result: Any, warn: Warn) -> Path | None:
    """`keep`, with a failure to write (a read-only folder, a full disk) a one-line warning instead of
    an error: the evaluation itself stands. The file written, or None."""
    try:
        return keep(artifact, result, warn)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    except UserError as exc:
        reason = str(exc)
    warn(f"could not keep the result in {artifact}: {reason}; --json FILE (or Evaluation.to_dict()) keeps it")
    return None


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("hypercompress")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
