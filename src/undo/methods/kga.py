"""KGA (Wang et al., "KGA: A General Machine Unlearning Framework Based on Knowledge Gap
Alignment", ACL 2023): make the model as far from a forget-set model on the forget set as the
original model is from an extra-data model on that extra data.

Models: A_D, the original (the input model, frozen: "reference"); A_f, trained on the forget
set D_f; A_n, trained on extra data D_n disjoint from the training data (the task's
`extra_examples`); A*, the student, starting from A_D. A_f and A_n are auxiliary models the
engine trains, by default from a fresh initialisation with the experiment's pretraining recipe
(the paper trains them as it trained A_D; `aux_start: input` finetunes the input model instead,
for a checkpoint whose own initialisation is not at hand). Per step, on one batch of D_f, one of
D_n and one of retain data:
    L_a = | KL(A_f || A*) on D_f  -  KL(A_n || A_D) on D_n |
    L_r = KL(A_D || A*) on retain data
    L   = L_a + a * L_r,  a = 0.3 (the public code's README for generation and translation; 0.1 for classification)
each KL averaged over the batch's scored tokens (the public code sums over a sequence's every
position, padding included, and averages over sequences). The paper sums |.| over pairs
(y_f, y_n); the public code pairs a batch of D_f with a batch of D_n, as we do. Stop rule: training ends after the
first step whose L_a is at most `stop_gap` (0.05, the public code's --stop_value; it checks
every 200 updates, we every step)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

from ..errors import UndoError
from ..losses import forward_kl, scored_positions
from ..models import non_embedding_params
from ..training import LossOutput
from .base import AuxModel, Method, RetainLoss, check_weights, forget_and_retain_logits, frozen_logits


@dataclasses.dataclass
class KGAOptions:
    retain_weight: float = 0.3
    retain_loss: RetainLoss = "kl"                 # the paper: KL(A_D || A*) on retain data
    stop_gap: Optional[float] = 0.05               # stop once L_a <= this (None: run every step)
    aux_start: Literal["random", "input"] = "random"  # A_f and A_n: from a fresh init, or from the input model
    aux_steps: Optional[int] = None                # their training steps (None: the experiment's pretraining steps)

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)
        if self.stop_gap is not None and not self.stop_gap > 0:
            raise UndoError(f"{where}.stop_gap must be > 0 (or null for no stop rule), got {self.stop_gap}")
        if self.aux_steps is not None and self.aux_steps < 1:
            raise UndoError(f"{where}.aux_steps must be at least 1 (or null for the pretraining steps), got {self.aux_steps}")


def knowledge_gap(target_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_target || p) averaged over the scored tokens of a batch (`labels`)."""
    return forward_kl(target_logits, logits, scored_positions(labels))


def alignment_loss(forget_gap: torch.Tensor, extra_gap: torch.Tensor) -> torch.Tensor:
    """L_a = |KL(A_f || A*) on D_f - KL(A_n || A_D) on D_n| (the second is a constant)."""
    return (forget_gap - extra_gap.detach()).abs()


class KGA(Method):
    name = "kga"
    description = ("knowledge gap alignment (Wang et al.): |KL(A_f||A*) on forget - KL(A_n||A_D) on extra data| "
                   "+ a x KL(A_D||A*) on retain; stops once the gap is under a threshold")
    Options = KGAOptions
    forget_needs = frozenset({"forget", "extra", "reference"})  # reference: A_D, the input model
    # The public code: lr 5e-5, up to 12000 updates (BART). A tiny CPU model at lr 1e-4 (at 3e-4 the
    # ascent overshoots the gap within a few steps and costs retain answers), up to 100 steps,
    # which the stop rule cuts short.
    train_defaults = dict(Method.train_defaults, steps=100, lr=1e-4)

    def aux_models(self) -> dict[str, AuxModel]:
        o = self.options
        train = {"steps": o.aux_steps} if o.aux_steps else {}
        return {"forget_model": AuxModel(start=o.aux_start, data="forget", train=train),
                "extra_model": AuxModel(start=o.aux_start, data="extra", train=train)}

    def loss(self, model, batches) -> LossOutput:
        forget, extra = batches["forget"], batches["extra"]
        logits, retain_logits = forget_and_retain_logits(self, model, batches)
        forget_model_logits, f1 = frozen_logits(self.aux["forget_model"], forget)
        extra_model_logits, f2 = frozen_logits(self.aux["extra_model"], extra)
        original_logits, f3 = frozen_logits(self.reference, extra)
        forget_gap = knowledge_gap(forget_model_logits, logits, forget["labels"])
        extra_gap = knowledge_gap(extra_model_logits, original_logits, extra["labels"])
        gap = alignment_loss(forget_gap, extra_gap)
        logs = {"gap": gap.item(), "forget_gap": forget_gap.item(), "extra_gap": extra_gap.item()}
        out = self.with_retain(model, batches, LossOutput(gap, logs, f1 + f2 + f3), retain_logits)
        # the model (all of it, as A_D: 6N per token) trains on forget and retain tokens only; the
        # extra batch feeds frozen models, whose forwards extra_flops holds
        trained = sum(batches[k]["input_ids"].numel() for k in ("forget", "retain") if k in batches)
        out.train_flops = 6.0 * non_embedding_params(self.reference) * trained
        return out

    def stop_after_step(self, logs: dict[str, float]) -> bool:
        stop = self.options.stop_gap
        return stop is not None and logs.get("gap", float("inf")) <= stop
