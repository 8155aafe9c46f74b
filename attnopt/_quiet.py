"""Keep torch's / onnxscript's internal chatter out of normal output, only around our calls.

torch.export logs graph dumps when a capture fails (the failure is reported as a
``CaptureError`` anyway), the ONNX exporter warns about every torchvision op it cannot register,
pytree raises a ``LeafSpec`` FutureWarning and onnxscript's constant folding logs every node it
skips. None of it is actionable for an attnopt user. ``quiet()`` raises those loggers to ERROR and
ignores those warnings for the duration of one attnopt call, then restores them: the user's
process keeps its own logging and warning settings.

Nothing is silenced when the ``attnopt`` logger is at DEBUG (``attnopt -v``) or when the user
asked torch for logs with ``TORCH_LOGS``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr

_NOISY = ("torch", "onnxscript", "onnx_ir")
_WARNINGS = (
    (FutureWarning, r".*LeafSpec.*"),
    (UserWarning, r".*torchvision.*"),
)


def verbose() -> bool:
    """True when the user asked for attnopt's debug output."""
    return logging.getLogger("attnopt").isEnabledFor(logging.DEBUG)


@contextmanager
def quiet(*, stderr: bool = False) -> Iterator[None]:
    """Silence third-party warnings and info/warning logs for the duration of the block.

    Args:
        stderr: also hold back what is printed to ``sys.stderr`` (torch.export prints the
            partial graph of a failed capture there); it is written out when the block
            succeeds and dropped when it raises (the attnopt error says what failed).
    """
    if verbose():
        yield
        return
    prefixes = tuple(p for p in _NOISY if not (p == "torch" and os.environ.get("TORCH_LOGS")))
    names = [n for n in list(logging.Logger.manager.loggerDict)
             if n in prefixes or n.startswith(tuple(p + "." for p in prefixes))]
    names += [p for p in prefixes if p not in names]
    saved: dict[str, int] = {}
    for name in names:
        logger = logging.getLogger(name)
        # Loggers left at NOTSET inherit from the raised top-level logger.
        if logger.level != logging.NOTSET or name in prefixes:
            saved[name] = logger.level
            if logger.level < logging.ERROR:
                logger.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stderr(held) if stderr else _nothing():
            for category, message in _WARNINGS:
                warnings.filterwarnings("ignore", category=category, message=message)
            yield
        if held.getvalue():
            sys.stderr.write(held.getvalue())
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
