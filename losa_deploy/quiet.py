"""Third-party noise control: transformers' legacy-tokenizer notice, "`torch_dtype` is deprecated", TracerWarnings,
library tqdm bars and the like are not the user's business. `--debug` (or LOSA_DEPLOY_DEBUG=1) shows them all.

Two levers:
- `configure(debug)`: the CLI calls it once, before any heavy import. Library log levels go to ERROR (through the
  libraries' own environment variables, so it also holds for modules imported later), Python warnings are ignored
  (our own messages never use the `warnings` module: they are printed by losa_deploy.console), third-party tqdm bars
  are off (ours are Rich, losa_deploy.progress).
- `quiet()`: a context manager around our calls into libraries, for use from Python (no CLI): the same silencing,
  restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# Loggers whose WARNING lines are written for library developers, not for our users.
THIRD_PARTY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "optimum", "accelerate", "lm_eval", "lm-eval",
                       "torch.onnx", "onnxruntime", "urllib3", "filelock", "compressed_tensors", "peft", "sparsezoo",
                       "deepsparse")
_ENV_QUIET = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}
_state = {"debug": os.environ.get("LOSA_DEPLOY_DEBUG", "") not in ("", "0"), "cli_quiet": False}


def debug_enabled() -> bool:
    return _state["debug"]


def configure(debug: bool) -> None:
    """Process-wide setting for one CLI run: quiet unless `debug`."""
    _state["debug"] = debug
    _state["cli_quiet"] = not debug
    if debug:
        for k, v in _ENV_QUIET.items():
            if os.environ.get(k) == v:
                del os.environ[k]
        _set_library_levels(logging.WARNING)
        _loguru(enable=True)
        return
    for k, v in _ENV_QUIET.items():
        os.environ.setdefault(k, v)
    _set_library_levels(logging.ERROR)
    _loguru(enable=False)
    warnings.simplefilter("ignore")


def _set_library_levels(level: int) -> None:
    """Modules imported already do not read the environment again: set their levels directly."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity(level)
        (tlog.enable_progress_bar if level < logging.ERROR else tlog.disable_progress_bar)()
    if "datasets" in sys.modules:
        from datasets.utils import logging as dlog

        dlog.set_verbosity(level)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import logging as hlog

        hlog.set_verbosity(level)


def _loguru(enable: bool) -> None:
    """compressed-tensors logs through loguru, which ignores the logging module's levels."""
    if "loguru" not in sys.modules and _missing("loguru"):
        return
    from loguru import logger

    (logger.enable if enable else logger.disable)("compressed_tensors")


def _missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence third-party warnings and log lines inside the block (nothing changes under --debug)."""
    if _state["debug"]:
        yield
        return
    saved = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    from transformers.utils import logging as tlog  # the block would import it anyway; its level must be set first

    tverb = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        _loguru(enable=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, lvl in saved.items():
            logging.getLogger(name).setLevel(lvl)
        tlog.set_verbosity(tverb)
        _loguru(enable=not _state["cli_quiet"])
