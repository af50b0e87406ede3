"""A second text domain every machine has: the documentation of Python's standard library.

Recovery that trains on calibration text can fit that text's domain (WikiText: encyclopedia
articles) and lose more elsewhere. This builds a held-out text of another kind, technical prose
about software, from the docstrings of the standard-library modules below (in this order, each
module's own docstring then its public classes' and functions' by name), so that the loss gap
between the calibration domain and this one can be reported (benchmarks/frontier.py). It is never
trained on. The text depends on the Python version (docstrings change between releases): its
protocol line names the version and the text's sha256.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform

MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
           "ftplib", "functools", "gettext", "heapq", "html.parser", "http.client", "http.server", "inspect",
           "ipaddress", "itertools", "json", "logging", "mailbox", "pathlib", "pickle", "pprint", "queue",
           "random", "re", "sched", "selectors", "shutil", "smtplib", "socket", "sqlite3", "statistics",
           "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest",
           "urllib.parse", "uuid", "xml.etree.ElementTree", "zipfile")


def _docs(module) -> list[str]:
    parts = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            parts.append(inspect.getdoc(obj) or "")
    return [p.strip() for p in parts if p and len(p.strip()) > 40]


def stdlib_docs_text() -> str:
    """The docstrings of MODULES joined by blank lines (about 0.5 MB of text)."""
    parts = []
    for name in MODULES:
        try:
            parts += _docs(importlib.import_module(name))
        except ImportError:  # a Python built without one (sqlite3): the text says which version it is
            continue
    return "\n\n".join(parts) + "\n"


def describe(text: str) -> str:
    """'Python 3.12.3 standard-library docstrings (sha256 1a2b3c4d...)'."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"Python {platform.python_version()} standard-library docstrings ({len(text):,} characters, sha256 {digest})"
