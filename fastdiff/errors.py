"""The errors fastdiff raises about its caller's input.

Every check of a user's argument, option, file or checkpoint raises :class:`InputError` (a
``ValueError``) or :class:`InputTypeError` (a ``TypeError``), so code that catches ``ValueError`` /
``TypeError`` keeps working, while the command line can tell a bad input (one ``fastdiff: error:`` line,
exit 2) from a bug of ours (any other exception: a traceback).
"""

from __future__ import annotations

__all__ = ["FastdiffError", "InputError", "InputTypeError"]


class FastdiffError(Exception):
    """Base of the errors about the caller's input; the message names the argument it is about."""


class InputError(FastdiffError, ValueError):
    """A value the caller passed (argument, option, file, checkpoint) is invalid."""


class InputTypeError(FastdiffError, TypeError):
    """An argument the caller passed has the wrong type."""
