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


def quiet_libraries() -> None:
    """Silence the libraries' own bars and chatter (every process that runs stages calls it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    hf_logging.set_verbosity_error()
