"""The project's user-error types; all derive from `processing.CaptionerError`.

A command-line tool catches `CaptionerError` once (`cli.run_cli`), prints one line and exits 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from processing import CaptionerError, ImageLoadError

__all__ = [
    "CaptionerError",
    "DatasetFormatError",
    "DatasetUnavailableError",
    "ImageLoadError",
    "TrainingError",
    "UsageError",
]


class UsageError(CaptionerError, ValueError):
    """A bad command-line argument or model/output path; the message names it."""


class DatasetFormatError(CaptionerError, ValueError):
    """A local dataset that does not have the expected layout; the message names the file and line."""


class DatasetUnavailableError(CaptionerError, RuntimeError):
    """A Hub dataset that cannot be loaded (offline, not found); the message names the alternatives."""


class TrainingError(CaptionerError, RuntimeError):
    """A run that cannot go on (a full disk, a diverged loss); the message says what was kept."""
