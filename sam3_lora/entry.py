"""What both entry points (`sam3-lora`, `python train.py`) share: known third-party warnings and expected failures.

Standard library only at import time: the CLI imports this before deciding whether torch is needed at all.
"""

from __future__ import annotations

import linecache
import logging
import warnings
from pathlib import Path

# Notices third-party code prints while sam3 is imported, none of them about the user's run:
KNOWN_THIRD_PARTY_WARNINGS = (
    # sam3/model/box_ops.py:145 (and others) decorate functions with @torch.jit.script at import
    # (torch/jit/_script.py:1491: "`torch.jit.script` is deprecated. Please switch to torch.compile ...").
    (FutureWarning, r"`torch\.jit\.script` is "),
    # sam3/model/sam3_video_inference.py:798,906 decorate methods with @torch.autocast("cuda"), which warns at
    # import on machines without CUDA (torch/amp/autocast_mode.py:286).
    (UserWarning, r"CUDA is not available or torch_xla is imported\. Disabling autocast\."),
)

# Exception types that, raised by a `raise` statement of this package, carry a message written for the user
# (bad arguments, configuration, data, a gated hub, non-finite training...). The same types raised anywhere
# else (torch, sam3, the interpreter in our code: "too many values to unpack") are bugs: they keep the traceback.
OUR_MESSAGE_TYPES = (ValueError, KeyError, RuntimeError, ImportError)
PACKAGE_DIR = Path(__file__).resolve().parent


def silence_known_warnings() -> None:
    """Ignore exactly `KNOWN_THIRD_PARTY_WARNINGS` (message and category); every other warning still shows."""
    for category, message in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def log_lightning_through_root() -> None:
    """Log each Lightning line once, through the root logger's handlers (train.py: Hydra's console + run log file).

    lightning/__init__.py gives the "lightning" logger a console handler of its own, and lightning/pytorch/__init__.py
    (and fabric's) another one plus `propagate = False` when the root had no handler at that moment. sam3 gives
    the root a handler at import (sam3/perflib/nms.py:16 logs through `logging.debug`), so depending on import
    order every Lightning INFO line was printed twice (its handler, then the root's) or bypassed the run's log file.
    """
    import lightning  # noqa: F401  (its import adds the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def expected_failure(err: BaseException) -> BaseException | None:
    """The exception to report as one message without a traceback, or None when `err` looks like a bug.

    Expected are:
      - `OSError` (FileNotFoundError, PermissionError, IsADirectoryError, a corrupt image, ...): a path the
        user gave is missing, unreadable or unwritable — the message names the path;
      - `OUR_MESSAGE_TYPES` raised by a `raise` statement inside sam3_lora (DataValidationError,
        ConversionError, our config checks, the hub download error, NonFiniteTrainingError, ...);
      - either of these wrapped by Hydra's `InstantiationException` (a constructor called from the config).
    """
    if isinstance(err, OSError):
        return err
    if isinstance(err, OUR_MESSAGE_TYPES) and _raised_by_our_raise_statement(err):
        return err
    if type(err).__name__ == "InstantiationException" and err.__cause__ is not None:
        return expected_failure(err.__cause__)
    return None


def failure_message(err: BaseException) -> str:
    """The one-line text of an expected failure (KeyError's message without the quotes `str` adds)."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    text = str(err)
    return text if text else type(err).__name__


def _raised_by_our_raise_statement(err: BaseException) -> bool:
    traceback = err.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    filename = traceback.tb_frame.f_code.co_filename
    if not Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        return False
    return linecache.getline(filename, traceback.tb_lineno).lstrip().startswith("raise ")
