"""UNDIAL: self-distillation towards the reference's logits with the true token pushed down.

L = CE(p, softmax(z_ref - b * onehot(y))) on forget scored tokens + a * R(retain), b = 10."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..losses import scored_positions, soft_cross_entropy
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, frozen_logits, logits_of


@dataclasses.dataclass
class UNDIALOptions:
    beta: float = 10.0
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, beta=self.beta, retain_weight=self.retain_weight)


def undial_targets(ref_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Reference logits with b subtracted at each position's next (scored) token."""
    target = ref_logits.float().clone()
    next_tokens = labels[:, 1:].clamp(min=0)
    penalty = F.one_hot(next_tokens, target.shape[-1]).to(target.dtype) * beta
    target[:, :-1] -= penalty * (labels[:, 1:] >= 0).unsqueeze(-1)
    return target


class UNDIAL(Method):
    name = "undial"
    description = "self-distil from the reference with the true token's logit lowered by b (+ retain term)"
    Options = UNDIALOptions
    forget_needs = frozenset({"forget", "reference"})

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        ref_logits, flops = frozen_logits(self.reference, forget)
        target = undial_targets(ref_logits, forget["labels"], o.beta)
        loss = soft_cross_entropy(target, logits_of(model, forget), scored_positions(forget["labels"]))
        logs = {"undial": loss.item()}
        return self.with_retain(model, batches, LossOutput(loss, logs, flops))
