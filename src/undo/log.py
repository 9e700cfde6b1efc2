"""Messages and progress lines. Imported by everyone; imports no other undo module.

Under a multi-process launch only the main process (rank 0) speaks, so every line
appears once. The rank comes from torch.distributed when a group exists, else from the
launcher's environment (RANK), so this module needs nothing of the rest of the package.
"""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """One progress line on stdout, from the main process only."""
    if is_main_process():
        print(f"[undo] {message}", flush=True)


def warn(message: str) -> None:
    """A warning on stderr, from the main process only."""
    if is_main_process():
        print(f"undo: warning: {message}", file=sys.stderr, flush=True)
