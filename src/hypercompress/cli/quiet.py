"""Quiet by default: a command that loads models prints our lines and bars, not the libraries'.

Off unless `--verbose`: transformers' logging and progress bars (and huggingface_hub's, which it
switches with them), tqdm bars that do not choose for themselves (transformers' GGUF dequantization
bar on every load of a .gguf), lm-eval's logger (HFLM's notes on a model passed in memory), and the
Python warnings of other packages. `--verbose` leaves all of them at the libraries' defaults.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

VERBOSE = typer.Option(False, "--verbose", help="show the libraries' own logging, progress bars and "
                       "warnings (transformers, tqdm, lm-eval, Python warnings); quiet by default")
# any module but ours: a warning attributed to our code keeps its filters (it is ours to fix; the tests
# make our deprecations errors)
_OTHER_MODULES = r"(?!hypercompress(\.|$))"


def quiet_libraries(verbose: bool) -> None:
    """Switch the libraries' noise off (unless `verbose`); called first thing in a command that
    loads models, before torch or transformers is imported (tqdm, transformers and huggingface_hub
    read their switches when first imported; a variable the user set is left as it is)."""
    if verbose:
        return
    # a tqdm bar that passes no disable= stays off (tqdm >= 4.66 reads TQDM_*); lm-eval's request
    # bars pass disable= themselves and still show
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers.utils.logging" in sys.modules:  # already imported (the command run in-process)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not sys.warnoptions:  # -W or PYTHONWARNINGS given: the user chose which warnings to see
        warnings.filterwarnings("ignore", module=_OTHER_MODULES)
    warnings.formatwarning = _one_line  # ours (a corpus cache written again, ...): "warning: ..." only


def _one_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI prints it: one line, no source location."""
    return f"warning: {message}\n"
