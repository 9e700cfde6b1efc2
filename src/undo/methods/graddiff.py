"""GradDiff: L = -CE(forget) + a * R, R = CE(retain) ("nll") or KL(p_ref || p) on retain ("kl").

The paper's public code: a = 1 (language), 15 (arithmetic); 10-100 steps; lr swept."""

from __future__ import annotations

import dataclasses

from ..training import LossOutput
from ..metrics import masked_ce
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits


@dataclasses.dataclass
class GradDiffOptions:
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)


class GradDiff(Method):
    name = "graddiff"
    description = "gradient ascent on forget + descent on retain: -CE(forget) + a * (CE or KL to ref)(retain)"
    Options = GradDiffOptions
    task_defaults = {"arithmetic": {"retain_weight": 15.0}, "language": {"retain_weight": 1.0}}

    def loss(self, model, batches) -> LossOutput:
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        forget_ce = masked_ce(forget_logits, batches["forget"]["labels"])
        return self.with_retain(model, batches, LossOutput(-forget_ce, {"forget_ce": forget_ce.item()}), retain_logits)
