"""One exception type for bad user input.

Every message is one line that names the problem and the fix; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (path, recipe key, artifact, data): printed as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def user_path(spec: str | os.PathLike[str]) -> Path:
    """Path(spec) with '~' expanded; a '~name' whose home directory is unknown is a UserError."""
    try:
        return Path(spec).expanduser()
    except RuntimeError as exc:  # pathlib: "Could not determine home directory"
        raise UserError(f"{spec}: {str(exc).rstrip('.')}; pass a full path") from None
