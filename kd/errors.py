"""The one exception type for bad user input.

Anything the user can fix (a recipe key, a missing file, an empty dataset) raises `UserError`. The entry points
(`kd` CLI, launchers/train.py) catch it, print it (`report`: one ``kd: error:`` line per problem) and exit with code 2,
so users never see a traceback for a mistake in their own input. Bugs in kd stay ordinary exceptions with tracebacks.
"""
from __future__ import annotations

from typing import Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input, reported as ``FILE: KEY: MESSAGE``.

    ``key`` is the dotted recipe key the problem belongs to (``data.train.path``); ``file`` is the recipe or data file.
    The entry point fills ``file`` with the recipe path when the raiser did not know it. ``more`` holds further
    problems found in the same pass (a recipe with several bad keys), so the user can fix them all in one go;
    ``str()`` gives one ``FILE: KEY: MESSAGE`` line per problem, this one first.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None,
                 more: Sequence[UserError] = ()):
        super().__init__(message)
        self.message = message
        self.key = key
        self.file = file
        self.more = list(more)

    @classmethod
    def several(cls, problems: Sequence[UserError]) -> UserError:
        """One error carrying every problem of `problems` (at least one), in order."""
        first, *rest = [one for problem in problems for one in problem.problems]
        return cls(first.message, key=first.key, file=first.file, more=rest)

    @property
    def problems(self) -> list[UserError]:
        return [self, *self.more]

    def _line(self) -> str:
        return ": ".join([p for p in (self.file, self.key) if p] + [self.message])

    def __str__(self) -> str:
        return "\n".join(p._line() for p in self.problems)

    def report(self, prefix: str = "kd: error: ") -> str:
        """What an entry point prints: one line per problem, each starting with `prefix`."""
        return "\n".join(prefix + p._line() for p in self.problems)
