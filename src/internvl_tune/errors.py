"""User-facing errors: raised for mistakes a user can fix, printed by the CLI without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, flag, checkpoint) that they can fix.

    The message should say what is wrong, where (file, line, field) and how to fix it.
    """


def problem_line(message: str, where: str | None = None, fix: str | None = None) -> str:
    """``where: message — fix``: how every data problem is printed (training, ``data check``, skip lists)."""
    text = f"{where}: {message}" if where else message
    return text + (f" — {fix}" if fix else "")


class DataError(UserError):
    """A problem in a dataset file; ``where`` is ``file:line`` when known."""

    def __init__(self, message: str, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(problem_line(message, where, fix))


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded exactly (missing, unexpected or mis-shaped tensors, bad config)."""


class MediaError(DataError):
    """An image or video file a sample names that cannot be used (missing, empty, not decodable, too large).

    A separate class because training meets these at run time too: a file that `data check` read may have gone or
    changed since, so the message differs from that of a mistake in the line itself.
    """


class StorageError(UserError):
    """An output could not be written: the disk is full, over quota, read-only or not writable for this user.

    Kept apart from other user errors so that scripts can tell "free some space and resume" from "fix the input":
    the CLI exits with its own status (``cli.EXIT_STORAGE``).
    """
