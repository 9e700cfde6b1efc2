"""UNDIAL: self-distillation towards the reference's logits with the true token pushed down.

L = CE(p, softmax(z_ref - b * onehot(y))) on forget scored tokens + a * R(retain), b = 10."""

from __future__ import annotations

import dataclasses

import torch

from ..losses import scored_positions, soft_cross_entropy
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits, frozen_logits


@dataclasses.dataclass
class UNDIALOptions:
    beta: float = 10.0
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, beta=self.beta, retain_weight=self.retain_weight)


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the token each position predicts (labels shifted like the logits; 0 where none is scored)."""
    tokens = torch.zeros_like(labels)
    tokens[:, :-1] = labels[:, 1:].clamp(min=0)
    return tokens


def undial_targets(ref_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Reference logits (a float32 copy) with b subtracted at each position's next (scored)
    token. The loss does not build them: it lowers them chunk by chunk (soft_cross_entropy's
    `lower`), to the same bits; this spells the targets out."""
    target = ref_logits.float().clone()
    shift = torch.where(scored_positions(labels), -beta, -0.0).to(target.dtype)  # x + (-0.0) is x
    return target.scatter_add_(-1, next_tokens(labels).unsqueeze(-1), shift.unsqueeze(-1))


class UNDIAL(Method):
    name = "undial"
    description = "self-distil from the reference with the true token's logit lowered by b (+ retain term)"
    Options = UNDIALOptions
    forget_needs = frozenset({"forget", "reference"})

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        ref_logits, flops = frozen_logits(self.reference, forget)
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        loss = soft_cross_entropy(ref_logits, forget_logits, scored_positions(forget["labels"]),
                                  lower=(next_tokens(forget["labels"]), o.beta))
        logs = {"undial": loss.item()}
        return self.with_retain(model, batches, LossOutput(loss, logs, flops), retain_logits)
