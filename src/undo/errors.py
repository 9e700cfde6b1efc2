"""The one exception type users see: a problem in their input, with the fix."""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Union


class UndoError(Exception):
    """Bad input or an unrecoverable condition the user can fix.

    The CLI prints the message as one line and exits with code 2 (no traceback).
    Messages name the problem and the fix, e.g.
    "unknown method 'gradif'; known: graddiff, maxent, rmu (see `undo methods`)".
    """

    exit_code = 2


class DivergedError(UndoError):
    """Training diverged (a NaN or infinite loss): the stage's resume points are discarded."""


WRITE_FIX = "free disk space, or choose a writable directory (--run-dir / --out)"


@contextlib.contextmanager
def write_errors(path: Union[str, Path], fix: str = WRITE_FIX,
                 cleanup: Union[None, str, Path, Callable[[], None]] = None) -> Iterator[None]:
    """Turn a failed write inside the block (an OSError: disk full, read-only, a file where a
    directory belongs; or a library's report of one) into one UndoError naming `path` and `fix`, after deleting
    `cleanup` (the temporary file or directory the write was building, or a function that
    deletes them), so nothing is left half-written."""
    try:
        yield
    except Exception as e:
        reason = _write_failure(e)
        if reason is None:
            raise
        _remove(cleanup)
        raise UndoError(f"cannot write {path} ({reason}); {fix}") from None


def _remove(cleanup: Union[None, str, Path, Callable[[], None]]) -> None:
    if callable(cleanup):
        cleanup()
    elif cleanup is not None and Path(cleanup).is_dir():
        shutil.rmtree(cleanup, ignore_errors=True)
    elif cleanup is not None:
        Path(cleanup).unlink(missing_ok=True)


# Libraries that write files report a failed write in their own exception types: safetensors
# ("I/O error: No space left on device (os error 28)"), torch.save ("[enforce fail at
# inline_container.cc:...] unexpected pos"; "PytorchStreamWriter failed writing file").
_LIBRARY_WRITE_FAILURE = re.compile(r"os error \d+|I/O error|inline_container\.cc|PytorchStreamWriter")


def _write_failure(e: BaseException) -> Optional[str]:
    """Why a write failed, if `e` is a failed write (an OSError, or a library's report of one)."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e) or type(e).__name__
        return reason + (f" at {e.filename}" if e.filename else "")
    if type(e).__name__ == "SafetensorError" or isinstance(e, RuntimeError):
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if _LIBRARY_WRITE_FAILURE.search(text):
            return text[:200]
    return None
