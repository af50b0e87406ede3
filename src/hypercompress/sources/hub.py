"""Hugging Face hub model ids (org/name): read from the cache or downloaded, and refused at once
when neither can be done.

transformers, offline or with the hub out of reach, retries each file for about 30 s ("Retrying in
8s [Retry 5/5]") before its error. Here one HEAD request (3 s at most, no retry) decides first:
offline (HF_HUB_OFFLINE) or unreachable, a model in the cache loads from it (local_files_only),
one that is not is a one-line UserError naming the fix. This module imports neither torch nor
transformers: the command line checks a hub id before it loads the library.
"""

from __future__ import annotations

import functools
import re

from ..errors import UserError, user_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: str) -> bool:
    """Whether a model source names a hub model: org/name, and no local path or .gguf file."""
    return (bool(HUB_ID.match(spec)) and not spec.startswith((".", "/")) and not spec.endswith(".gguf")
            and not user_path(spec).exists())


def check_hub_model(spec: str) -> None:
    """A UserError now, before anything loads, when `spec` is a hub id that can be neither read
    from the cache nor downloaded; nothing for any other source."""
    if is_hub_id(spec):
        hub_cache_only(spec)


@functools.lru_cache(maxsize=None)
def hub_cache_only(repo_id: str) -> bool:
    """Whether hub model `repo_id` is read from the Hugging Face cache only (True) or may be
    downloaded (False); a UserError when it is not cached and HF_HUB_OFFLINE is set or the hub
    cannot be reached. Decided once per process and model (the check, then the load, ask twice)."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)  # a path, else unknown / absent
    if is_offline_mode():
        if cached:
            return True
        raise UserError(f"HF_HUB_OFFLINE is set and {repo_id} is not in the Hugging Face cache; "
                        "unset it, or pass a local model directory")
    problem = hub_unreachable(constants.ENDPOINT)
    if problem is None:
        return False
    if cached:
        return True
    raise UserError(f"cannot reach {constants.ENDPOINT} ({problem}) to download {repo_id}; connect, "
                    "set HF_HUB_OFFLINE=1 to use the cache, or pass a local model directory")


def hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """None if `endpoint` (HF_ENDPOINT, else https://huggingface.co) answers one HEAD request
    within `timeout` seconds, whatever its status; else why not, e.g. '[Errno 111] Connection
    refused'. One try through huggingface_hub's own HTTP session (its proxies, certificates, headers)."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as exc:  # the HTTP library's DNS, connect, proxy, TLS or timeout error
        reason = str(exc).strip().splitlines()
        return reason[0][:200] if reason else type(exc).__name__
    return None
