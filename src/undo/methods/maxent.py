"""MaxEnt: push the forget predictions to uniform.

L = f * KL(Uniform || p) on forget scored tokens + a * R(retain), R = CE ("nll") or
KL(p_ref || p) ("kl"). Paper: f = 1, a = 1, R = CE on the synthetic tasks; the WMDP
variant is (1 - a) * KL(U || p) + a * KL(p_ref || p) with a in {0.1, 0.2, 0.3}, i.e.
forget_weight = 1 - a, retain_weight = a, retain_loss = "kl" (the wmdp task default)."""

from __future__ import annotations

import dataclasses

from ..losses import scored_positions, uniform_kl
from ..metrics import masked_ce
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits


@dataclasses.dataclass
class MaxEntOptions:
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, forget_weight=self.forget_weight, retain_weight=self.retain_weight)


class MaxEnt(Method):
    name = "maxent"
    description = "maximise entropy on forget: f * KL(U || p)(forget) + a * (CE or KL to ref)(retain)"
    Options = MaxEntOptions
    task_defaults = {"wmdp": {"forget_weight": 0.8, "retain_weight": 0.2, "retain_loss": "kl"}}

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        logits, retain_logits = forget_and_retain_logits(self, model, batches)
        kl_uniform = uniform_kl(logits, scored_positions(forget["labels"]))
        loss = o.forget_weight * kl_uniform
        logs = {"forget_kl_uniform": kl_uniform.item(), "forget_ce": masked_ce(logits.detach(), forget["labels"]).item()}
        flops = 0.0
        return self.with_retain(model, batches, LossOutput(loss, logs, flops), retain_logits)
