"""IdkDPO: DPO with an "I don't know" answer preferred over the true forget answer.

L = -(2/b) * mean_rows log sigmoid(b * ((log pi(y_idk) - log pi_ref(y_idk))
                                         - (log pi(y) - log pi_ref(y)))) + a * R(retain), b = 0.1.
The "idk" rows pair each forget example's prompt with an answer drawn (seeded) from
IDK_ANSWERS; the stage builds them aligned row for row with the forget rows."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch.nn.functional as F

from ..losses import sequence_logprob
from ..tasks.base import Example
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, frozen_logits_of_each, logits_of_each

IDK_ANSWERS = (
    " I don't know.",
    " I'm not sure.",
    " I have no idea.",
    " I can't answer that.",
    " Sorry, I don't know the answer.",
    " I am unable to answer this.",
    " That is something I don't know.",
    " I'm afraid I can't help with that.",
)


def idk_examples(forget: Sequence[Example], seed: int) -> list[Example]:
    """The preferred answers: each forget prompt with a seeded "I don't know" reply."""
    rng = random.Random(seed)
    return [Example(ex.prompt, rng.choice(IDK_ANSWERS)) for ex in forget]


@dataclasses.dataclass
class IdkDPOOptions:
    beta: float = 0.1
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)


def dpo_loss(win_logp, win_ref_logp, lose_logp, lose_ref_logp, beta: float):
    margin = (win_logp - win_ref_logp) - (lose_logp - lose_ref_logp)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


class IdkDPO(Method):
    name = "idkdpo"
    description = "DPO preferring 'I don't know' over the true forget answer (+ retain term)"
    Options = IdkDPOOptions
    forget_needs = frozenset({"forget", "idk", "reference"})
    row_format = "padded"

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        win, lose = batches["idk"], batches["forget"]
        logits = logits_of_each(model, [win, lose] + ([batches["retain"]] if o.retain_weight else []))
        win_logp = sequence_logprob(logits[0], win["labels"])
        lose_logp = sequence_logprob(logits[1], lose["labels"])
        (win_ref, lose_ref), flops = frozen_logits_of_each(self.reference, [win, lose])
        loss = dpo_loss(win_logp, sequence_logprob(win_ref, win["labels"]),
                        lose_logp, sequence_logprob(lose_ref, lose["labels"]), o.beta)
        logs = {"dpo": loss.item()}
        return self.with_retain(model, batches, LossOutput(loss, logs, flops), logits[2] if o.retain_weight else None)
