"""Several processes (`accelerate launch`, `torchrun`): who writes, and waiting for each other.

Every process runs the same command and the same stages; training shards each batch
across them (DDP/FSDP through accelerate), evaluation runs on every process (the numbers
are broadcast from the main one so that early-stop decisions agree), and only the main
process writes artifacts, the results store and the report. Runs on several nodes need
`runs/` on a filesystem every node sees.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import UndoError

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, known from the launcher's environment even before the process group exists."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def init() -> None:
    """Join the launcher's process group now (a no-op for one process), so that the first
    artifact write can already wait for the main process. Idempotent."""
    if world_size() == 1 or dist.is_initialized():
        return
    check_devices()
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def check_devices() -> None:
    """One GPU per process on a node: a launcher config asking for more processes than the
    node has GPUs would otherwise end in a CUDA 'invalid device ordinal' traceback."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local_world > gpus:
        raise UndoError(f"the launcher starts {local_world} processes on this node but it has {gpus} GPU(s); "
                        f"launch with --num_processes {gpus} per node (or rerun `accelerate config`)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not gpus:
        raise UndoError("the accelerate config asks for FSDP, which needs GPUs, and this machine has none; "
                        "launch without --use_fsdp (data parallel on CPU) or on a GPU machine")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: T) -> T:
    """The main process's `obj` on every process (a no-op for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ok: bool) -> bool:
    """Leave the process group at the end of a command (after success, all together);
    returns whether there was one. A process that leaves the group may still abort at
    interpreter exit (gloo threads held by DDP/FSDP modules, SIGABRT), so callers end
    such a process with `exit_now`."""
    if not dist.is_initialized():
        return False
    if ok:
        dist.barrier()
    dist.destroy_process_group()
    return True


def exit_now(code: int) -> None:
    """End the process without interpreter teardown (all files are closed by now)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
