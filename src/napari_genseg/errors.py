"""The one error type for mistakes in what a user gave us (no napari, no Qt, no torch).

``InputError`` is raised only where input is validated: files and folders, command-line and
widget options, checkpoints, data specifications. Its message is one line that says what is wrong
and, where possible, what to do. The CLI turns it into "genseg: error: ..." and exit status 2; the
dock widgets into a notification. Anything else that goes wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "one_line"]


class InputError(Exception):
    """A user's input that cannot be used (one-line message, no traceback needed)."""


def one_line(exc: BaseException) -> str:
    """``exc`` as one line for a status line, notification or ``genseg: error:``: an ``OSError``
    (not an ``InputError``) as "file: reason" from its ``filename`` and ``strerror``; otherwise
    the first non-blank line of its message, or its class name when the message is empty."""
    if isinstance(exc, OSError) and not isinstance(exc, InputError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__
