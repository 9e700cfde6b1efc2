"""NPO (negative preference optimisation): forget sequences are dispreferred, no preferred answer.

L = -(2/b) * mean_rows log sigmoid(-b * (log pi(y) - log pi_ref(y))) + a * R(retain),
log pi(y) = summed log-prob of a forget example's scored tokens (one example per row); b = 0.1."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from ..losses import sequence_logprob
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits, frozen_logits


@dataclasses.dataclass
class NPOOptions:
    beta: float = 0.1
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)


def npo_loss(logp, ref_logp, beta: float):
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


class NPO(Method):
    name = "npo"
    description = "negative preference optimisation on forget sequences vs. the reference (+ retain term)"
    Options = NPOOptions
    forget_needs = frozenset({"forget", "reference"})
    row_format = "padded"

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        logp = sequence_logprob(forget_logits, forget["labels"])
        ref_logits, flops = frozen_logits(self.reference, forget)
        ref_logp = sequence_logprob(ref_logits, forget["labels"])
        loss = npo_loss(logp, ref_logp, o.beta)
        logs = {"npo": loss.item(), "forget_logratio": (logp - ref_logp).mean().item()}
        return self.with_retain(model, batches, LossOutput(loss, logs, flops), retain_logits)
