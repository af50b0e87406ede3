"""Writing a directory atomically: everything goes into a hidden temporary directory beside the
target, renamed into place only when complete; on any error the temporary directory is removed, so
nothing is ever half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


def refuse_existing(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, or a UserError when it exists and is not an empty directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; pass a new --out path")
    return out


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory that becomes `out_dir` when the block completes.

    Raises UserError when `out_dir` exists and is not an empty directory, or its parent cannot be
    created. Files get the usual umask-based modes (mkdtemp and safetensors create owner-only ones).
    """
    out = refuse_existing(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot create the folder {out.parent} for {out.name} ({exc.strerror}); "
                        "pass an --out path in a writable folder") from None
    try:
        yield tmp
        _make_readable(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~umask)
