"""Gradient ascent: L = -CE(forget)."""

from __future__ import annotations

import dataclasses

from ..training import LossOutput
from .base import Method, ce_of


@dataclasses.dataclass
class GradAscentOptions:
    pass


class GradAscent(Method):
    name = "grad_ascent"
    description = "gradient ascent on forget data: L = -CE(forget)"
    Options = GradAscentOptions
    train_defaults = dict(Method.train_defaults, steps=20, lr=1e-4)

    def loss(self, model, batches) -> LossOutput:
        ce = ce_of(model, batches["forget"])
        return LossOutput(-ce, {"forget_ce": ce.item()})
