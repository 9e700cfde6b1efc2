"""SimNPO: NPO without a reference model, on length-normalised NLL.

L = f * -(2/b) * mean_rows log sigmoid(b * (sNLL(y)/|y| - d)) + a * R(retain);
b = 4.5, d = 0, f = 0.125, a = 1 (one example per row)."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from ..losses import scored_token_counts, sequence_logprob
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits


@dataclasses.dataclass
class SimNPOOptions:
    beta: float = 4.5
    delta: float = 0.0
    forget_weight: float = 0.125
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, forget_weight=self.forget_weight, retain_weight=self.retain_weight)


class SimNPO(Method):
    name = "simnpo"
    description = "reference-free NPO on length-normalised forget NLL (+ retain term)"
    Options = SimNPOOptions
    row_format = "padded"

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        mean_nll = -sequence_logprob(forget_logits, forget["labels"]) / scored_token_counts(forget["labels"])
        simnpo = -(2.0 / o.beta) * F.logsigmoid(o.beta * (mean_nll - o.delta)).mean()
        loss, logs, flops = o.forget_weight * simnpo, {"simnpo": simnpo.item(), "forget_ce": mean_nll.mean().item()}, 0.0
        return self.with_retain(model, batches, LossOutput(loss, logs, flops), retain_logits)
