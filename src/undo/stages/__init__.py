"""Stages: plain functions from (context: settings + input artifacts) to an output artifact.

STAGES maps a stage kind to its function and its version; the version is part of every
cache key, so a stage whose semantics change (its VERSION bumped) is never reused.
"""

from __future__ import annotations

from typing import Callable

from . import attack, aux, pretrain, select, undo, unlearn
from .base import StageContext, StageNode, StageOutput

STAGES: dict[str, tuple[Callable[[StageContext], StageOutput], int]] = {
    "pretrain": (pretrain.run, pretrain.VERSION),
    "checkpoint": (pretrain.run_checkpoint, pretrain.VERSION),
    "aux": (aux.run, aux.VERSION),
    "unlearn": (unlearn.run, unlearn.VERSION),
    "select": (select.run, select.VERSION),
    "noise": (undo.noise_run, undo.NOISE_VERSION),
    "distill": (undo.distill_run, undo.DISTILL_VERSION),
    "attack": (attack.run, attack.VERSION),
}

# The inputs whose cumulative compute a stage's output inherits (its "lineage"): the model it
# continues and every model it needed (a teacher, auxiliary models: a role ending in ":" stands
# for every input of that prefix). A selection names its own in its sidecar ("lineage").
LINEAGE = {"unlearn": ("model", "teacher", "aux:"), "aux": ("model",), "noise": ("model",),
           "distill": ("teacher", "student")}

__all__ = ["LINEAGE", "STAGES", "StageContext", "StageNode", "StageOutput"]
