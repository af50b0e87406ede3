"""A text source named on the command line, checked without reading it or importing torch: the
commands refuse a missing or unreadable `--calib` / `--data` / example file at once (data.read_text,
which reads it, runs the same check first)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, user_path

MAX_TEXT_BYTES = 1 << 30  # calibration and evaluation texts are read into memory whole


def is_dataset_spec(spec: str) -> bool:
    """Whether `spec` names a `datasets` split, NAME:CONFIG:SPLIT (not a path)."""
    return spec.count(":") == 2 and "/" not in spec and "\\" not in spec


def check_text_source(spec: str, option: str = "") -> Path | None:
    """The file `spec` names, checked (a regular file of at most MAX_TEXT_BYTES), or None for a
    `datasets` spec NAME:CONFIG:SPLIT. UserError (one line, naming `option` when given) for a
    directory, a device or FIFO, a file too large, or a path that does not exist."""
    name = f"{option} {spec}" if option else spec
    path = user_path(spec)
    if path.is_dir():
        raise UserError(f"{name} is a directory; pass a text file")
    if path.exists() and not path.is_file():
        raise UserError(f"{name} is not a regular file (a device or FIFO); pass a text file")
    if path.is_file():
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise UserError(f"{name} is {size:,} bytes; texts are read whole, up to {MAX_TEXT_BYTES:,} bytes: "
                            "pass a smaller sample of it")
        return path
    if is_dataset_spec(spec):
        return None
    missing = f"{option} {spec}: file not found" if option else f"data file not found: {spec}"
    raise UserError(f"{missing}; pass a text file or a datasets spec NAME:CONFIG:SPLIT "
                    "(e.g. wikitext:wikitext-2-raw-v1:test)")
