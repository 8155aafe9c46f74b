"""The attnopt error hierarchy: every error the library raises on purpose derives from AttnoptError.

Messages say what was expected, what was found and what to try.
"""

from __future__ import annotations


class AttnoptError(Exception):
    """Base class of every error attnopt raises on purpose."""


class ConfigError(AttnoptError, ValueError):
    """A configuration value or a public-API argument is invalid."""


class CallError(ConfigError, TypeError):
    """An optimized model was called in a way its captured graph cannot take.

    Attributes:
        argument: the argument (or input path) at fault, when known.
    """

    def __init__(self, message: str, *, argument: str = "") -> None:
        super().__init__(message)
        self.argument = argument


class CaptureError(AttnoptError):
    """The model could not be captured as a graph with ``torch.export``.

    Attributes:
        construct: a short name of what failed (e.g. ``"data-dependent branch"``).
        hint: what the user can try.
    """

    def __init__(self, message: str, *, construct: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.construct = construct
        self.hint = hint


class VariantNotApplicableError(AttnoptError):
    """A variant was forced on a site where it cannot be applied; the message says why."""


class ExportError(AttnoptError):
    """Exporting to ONNX (or building an engine) failed."""


class ValidationError(AttnoptError):
    """A numerical check failed: the measured error exceeds the tolerance.

    Attributes:
        error: the measured error (max abs difference relative to the reference's scale).
        tolerance: the tolerance it was compared against.
        where: what was compared (a site, an output, an input set).
    """

    def __init__(self, message: str, *, error: float, tolerance: float, where: str = "") -> None:
        super().__init__(message)
        self.error = error
        self.tolerance = tolerance
        self.where = where


class ServingError(AttnoptError):
    """Starting or talking to a model server failed (missing server environment, not ready)."""
