"""User-facing errors: raised for mistakes a user can fix, printed by the CLI without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, flag, checkpoint) that they can fix.

    The message should say what is wrong, where (file, line, field) and how to fix it.
    """


class DataError(UserError):
    """A problem in a dataset file; ``where`` is ``file:line`` when known."""

    def __init__(self, message: str, where: str | None = None, fix: str | None = None):
        self.where = where
        self.fix = fix
        text = f"{where}: {message}" if where else message
        if fix:
            text += f" — {fix}"
        super().__init__(text)


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded exactly (missing, unexpected or mis-shaped tensors, bad config)."""


class StorageError(UserError):
    """An output could not be written: the disk is full, over quota, read-only or not writable for this user.

    Kept apart from other user errors so that scripts can tell "free some space and resume" from "fix the input":
    the CLI exits with its own status (``cli.EXIT_STORAGE``).
    """
