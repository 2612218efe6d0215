"""The one error type for mistakes in what a user gave us (no napari, no Qt, no torch).

``InputError`` is raised only where input is validated: files and folders, command-line and
widget options, checkpoints, data specifications. Its message is one line that says what is wrong
and, where possible, what to do. The CLI turns it into "genseg: error: ..." and exit status 2; the
dock widgets into a notification. Anything else that goes wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(Exception):
    """A user's input that cannot be used (one-line message, no traceback needed)."""
