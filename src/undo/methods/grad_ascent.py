"""Gradient ascent: L = -CE(forget)."""

from __future__ import annotations

import dataclasses

from ..metrics import masked_ce
from ..training import LossOutput
from .base import Method, logits_of


@dataclasses.dataclass
class GradAscentOptions:
    pass


class GradAscent(Method):
    name = "grad_ascent"
    description = "gradient ascent on forget data: L = -CE(forget)"
    Options = GradAscentOptions
    train_defaults = dict(steps=20, lr=1e-4, batch_size=16, schedule="constant", warmup_steps=0)

    def loss(self, model, batches) -> LossOutput:
        ce = masked_ce(logits_of(model, batches["forget"]), batches["forget"]["labels"])
        return LossOutput(-ce, {"forget_ce": ce.item()})
