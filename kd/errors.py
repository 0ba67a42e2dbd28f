"""The one exception type for bad user input.

Anything the user can fix (a recipe key, a missing file, an empty dataset) raises `UserError`. The entry points
(`kd` CLI, launchers/train.py) catch it, print one line and exit with code 2, so users never see a traceback for a
mistake in their own input. Bugs in kd stay ordinary exceptions with tracebacks.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input, reported as ``FILE: KEY: MESSAGE``.

    ``key`` is the dotted recipe key the problem belongs to (``data.train.path``); ``file`` is the recipe or data file.
    The entry point fills ``file`` with the recipe path when the raiser did not know it.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.file = file

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        return ": ".join(parts + [self.message])
