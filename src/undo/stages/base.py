"""What a stage function receives and returns.

A stage is a plain function `run(ctx) -> StageOutput`. The engine's one stage helper
(`engine.runner.run_stage`) looks up the cache, hands the stage its context (its node's
parameters, its input artifacts, the per-seed experiment, a resume directory keyed by
the stage's cache key), then writes what the stage returns atomically and records it.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..artifacts import Artifact, ModelDir
from ..tasks import Task, build_task


@dataclasses.dataclass
class StageNode:
    """One stage of a graph. `id` is also its directory under the run ("seed0/unlearn/rmu")."""

    id: str
    kind: str                        # a key of stages.STAGES
    name: str                        # the model's name in results (base, rmu, undo_a0.3) or the attack target
    seed: int
    params: dict[str, Any]           # the stage's own settings, JSON-able: part of the cache key
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> id of the stage it reads
    record: Optional[str] = None     # the model kind in the results store; None: no model row
    key: str = ""                    # the cache key (set by engine.graph.stage_key)


@dataclasses.dataclass
class StageContext:
    node: StageNode
    exp: Any                         # the ExperimentConfig of this node's seed
    inputs: dict[str, Artifact | ModelDir]
    resume_dir: Path                 # <stage>.resume/<key>: a resume point of another config is never used
    say: Any = print

    @cached_property
    def task(self) -> Task:
        return build_task(self.exp.task, self.exp.seed)

    @property
    def params(self) -> dict[str, Any]:
        return self.node.params

    def input_result(self, role: str) -> dict[str, Any]:
        return self.inputs[role].result() or {}


@dataclasses.dataclass
class StageOutput:
    sidecar: dict[str, Any]          # metrics, flops, steps, wall_seconds, ... (result.json)
    model: Optional[PreTrainedModel] = None
    tokenizer: Optional[PreTrainedTokenizerBase] = None
    state_dict: Optional[dict[str, torch.Tensor]] = None  # FSDP: gathered full weights
