"""The one exception type users see: a problem in their input, with the fix."""


class UndoError(Exception):
    """Bad input or an unrecoverable condition the user can fix.

    The CLI prints the message as one line and exits with code 2 (no traceback).
    Messages name the problem and the fix, e.g.
    "unknown method 'gradif'; known: graddiff, maxent, rmu (see `undo methods`)".
    """

    exit_code = 2


class DivergedError(UndoError):
    """Training diverged (a NaN or infinite loss): the stage's resume points are discarded."""
