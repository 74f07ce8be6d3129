"""The errors fastdiff raises about its caller's input.

Every check of a user's argument, option, file or checkpoint raises :class:`InputError` (a
``ValueError``) or :class:`InputTypeError` (a ``TypeError``), so code that catches ``ValueError`` /
``TypeError`` keeps working, while the command line can tell a bad input (one ``fastdiff: error:`` line,
exit 2) from a bug of ours (any other exception: a traceback).
"""

from __future__ import annotations

__all__ = ["FastdiffError", "InputError", "InputFileNotFoundError", "InputTypeError"]


class FastdiffError(Exception):
    """Base of the errors about the caller's input; the message names the argument it is about."""


class InputError(FastdiffError, ValueError):
    """A value the caller passed (argument, option, file, checkpoint) is invalid."""


class InputTypeError(FastdiffError, TypeError):
    """An argument the caller passed has the wrong type."""


class InputFileNotFoundError(FastdiffError, FileNotFoundError):
    """A file or directory the caller named (a checkpoint, a data file, a tokenizer) does not exist, or is
    not the kind of file it must be."""
