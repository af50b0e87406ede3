"""Writing files and directories atomically, so that a kill at any instant leaves either the old
content or the new one, never a torn mix.

- `replace_file(path, write)`: `write(tmp)` fills a hidden temporary file beside `path`, which is
  flushed to disk and renamed over `path` (os.replace: atomic on POSIX).
- `atomic_directory(out)`: everything goes into a hidden `.OUT.partial-HOST-PID-XXXX` directory
  beside the target, renamed into place only when complete; on an error it is removed. A writer
  killed outright (SIGKILL, power loss) leaves it behind: the next write to the same OUT removes
  those of this host whose process is gone (`remove_stale_partials`), never a live writer's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError, user_path

PARTIAL = ".partial-"  # hidden temporary directories: .{out.name}.partial-{host}-{pid}-{random}


def refuse_existing(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, or a UserError when it exists and is not an empty directory."""
    out = user_path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} already exists and is not a folder; pass a new --out path")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output {out} already exists and is not empty; pass a new --out path")
    return out


def _host_tag() -> str:
    """8 hex digits naming this machine (a pid means nothing on another host of a shared disk)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host may still run (False only when it surely does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number we cannot judge): leave it alone
    return True


def stale_partials(out: Path) -> list[Path]:
    """Hidden partial directories of `out` written on this host by processes that no longer run.
    Ones of other hosts, of live processes, or not named by this module are never listed."""
    prefix = f".{out.name}{PARTIAL}{_host_tag()}-"
    stale = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            stale.append(entry)
    return stale


def remove_stale_partials(out: Path) -> None:
    """Remove what killed writers of `out` left behind (see stale_partials)."""
    for entry in stale_partials(out):
        shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory that becomes `out_dir` when the block completes.

    Raises UserError when `out_dir` exists and is not an empty directory, or its parent cannot be
    created. Files get the usual umask-based modes (mkdtemp and safetensors create owner-only ones)
    and are flushed to disk before the rename, so `out_dir` never exists half-written.
    """
    out = refuse_existing(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{_host_tag()}-{os.getpid()}-",
                                    dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot create the folder {out.parent} for {out.name} ({exc.strerror}); "
                        "pass an --out path in a writable folder") from None
    try:
        yield tmp
        _make_readable(tmp)
        _sync_tree(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        _sync_directory(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Atomically give `path` the content `write(tmp)` puts into a temporary file beside it.

    A kill at any instant leaves `path` as it was or complete; the temporary file of a killed
    writer (`.NAME.tmp-PID`) is harmless and overwritten by the next write of that process id."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _sync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _sync_file(Path(root) / name)
        _sync_directory(Path(root))


def _make_readable(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~umask)


def check_output_folder(path: Path, option: str = "--out") -> None:
    """Before any long work: `path` (a folder to create) can be created, i.e. its nearest existing
    ancestor is a writable folder, not a regular file. Raises UserError naming `option` otherwise."""
    _check_creatable(user_path(path), option)


def check_output_file(path: Path | None, option: str = "--json") -> None:
    """Before any long work: a file can be written at `path` (None: nothing to check). Raises
    UserError naming `option` when `path` is a folder, an unwritable file, or lies under a regular
    file or in a folder this user cannot write."""
    if path is None:
        return
    path = user_path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a file path such as {path / 'report.json'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UserError(f"{option} {path}: the file is not writable; pass a path you can write")
        return
    _check_creatable(path, option)


def _check_creatable(path: Path, option: str) -> None:
    """UserError unless `path` (and its missing folders) can be created: the nearest existing folder
    is writable, no missing folder on the way is a link to nowhere, and a file made there and removed
    at once proves it (os.access answers yes for root in /proc and on some read-only mounts)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():
            raise UserError(f"{option} {path}: {ancestor} is a link to a missing place ({os.readlink(ancestor)}); "
                            "pass a path in a writable folder")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {path}: {ancestor} is a file, not a folder; pass a path in a writable folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: the folder {ancestor} is not writable; pass a path in a "
                        "writable folder")
    try:
        handle, probe = tempfile.mkstemp(dir=ancestor, prefix=".hypercompress-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {path}: nothing can be created in {ancestor} ({exc.strerror}); pass a path in "
                        "a writable folder") from None
