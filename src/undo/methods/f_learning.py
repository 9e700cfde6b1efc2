"""F-Learning (Ni et al., 2023, "Forgetting before Learning"): update facts by first forgetting the old ones.

1. Forget: a copy of the model finetuned on the OLD facts (L = CE) gives the task vector
   Delta = theta_old - theta, and theta' = theta - l * Delta (task_vector's arithmetic,
   `subtract_task_vector`). The copy is an auxiliary model: the engine trains and caches it as a
   stage of its own (`AuxModel(data="old")`), so a sweep over l trains it once. With `lora_rank`
   the copy learns through LoRA adapters (peft) that are merged into it: Delta is then the merged
   adapters' change, (alpha / r) B A on the adapted matrices and 0 everywhere else (the paper's
   cheaper variant).
2. Learn: theta' is finetuned on the UPDATED facts (L = CE on the "update" stream: the changed
   questions with their new answers and the biographies with the new values).

`scale` = 0 skips step 1: plain finetuning on the updates, the paper's baseline.
Data: a task with knowledge updates (facts with `update_attributes`); metrics: the task's
update/reliability, update/generality, update/locality.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import UndoError
from ..training import LossOutput
from .base import AuxModel, Method, ce_of
from .task_vector import subtract_task_vector


@dataclasses.dataclass
class FLearningOptions:
    scale: float = 1.0          # l in theta' = theta - l * Delta (to tune); 0: plain finetuning on the updates
    forget_steps: int = 50      # the finetune on the old facts (task_vector's defaults)
    forget_lr: float = 1e-3
    forget_batch_size: int = 16
    lora_rank: int = 0          # 0: Delta over every weight; r > 0: Delta of a rank-r LoRA adapter, merged
    lora_alpha: float = 16.0    # LoRA's scaling is alpha / r

    def validate(self, where: str) -> None:
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise UndoError(f"{where}.scale must be a number >= 0 (0: plain finetuning on the updates), got {self.scale}")
        for name in ("forget_steps", "forget_batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if not (self.forget_lr > 0 and math.isfinite(self.forget_lr)):
            raise UndoError(f"{where}.forget_lr must be a positive number, got {self.forget_lr}")
        if self.lora_rank < 0:
            raise UndoError(f"{where}.lora_rank must be >= 0 (0: full weights), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise UndoError(f"{where}.lora_alpha must be positive, got {self.lora_alpha}")


class FLearning(Method):
    name = "f_learning"
    description = "forget the old facts (theta - l * task vector of a finetune on them), then finetune on the new ones"
    Options = FLearningOptions
    train_defaults = dict(Method.train_defaults, steps=50, lr=1e-3)
    forget_needs = frozenset({"update"})  # the updated facts; the old ones reach the auxiliary model

    def aux_models(self) -> dict[str, AuxModel]:
        o = self.options
        if o.scale == 0:
            return {}
        train = {"steps": o.forget_steps, "lr": o.forget_lr, "batch_size": o.forget_batch_size,
                 "schedule": "constant", "warmup_steps": 0}
        lora = (o.lora_rank, o.lora_alpha) if o.lora_rank else None
        return {"old_facts": AuxModel("input", "old", train=train, lora=lora)}

    def start(self, model, streams) -> None:
        if self.options.scale:  # forgetting before learning
            subtract_task_vector(model, self.aux["old_facts"], self.options.scale)

    def loss(self, model, batches) -> LossOutput:
        ce = ce_of(model, batches["update"])
        return LossOutput(ce, {"update_ce": ce.item()})
