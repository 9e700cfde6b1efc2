"""Oracle matching: finetune the base model to imitate the oracle's outputs.

L = forward KL(p_oracle || p) at every position that predicts a real (non-pad) token of forget
and retain data.
The paper's claim 1: this makes the base behave like the oracle, yet it relearns the
forget capability far faster than the oracle does. The teacher is the oracle model
(`undo unlearn --teacher PATH`)."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import UndoError
from ..losses import forward_kl, next_token_positions
from ..training import LossOutput
from .base import Method, check_weights, frozen_logits_of_each, logits_of_each


@dataclasses.dataclass
class OracleMatchingOptions:
    temperature: float = 1.0
    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def validate(self, where: str) -> None:
        check_weights(where, forget_weight=self.forget_weight, retain_weight=self.retain_weight)
        if self.temperature <= 0:
            raise UndoError(f"{where}.temperature must be > 0, got {self.temperature}")


class OracleMatching(Method):
    name = "oracle_matching"
    description = "distil the oracle's outputs into the base model: KL(p_oracle || p) on forget + retain data"
    Options = OracleMatchingOptions
    train_defaults = dict(Method.train_defaults, steps=100, lr=1e-3, schedule="cosine", warmup_steps=5)

    def needs(self):
        return frozenset({"forget", "retain", "teacher"})

    def prepare(self, model) -> None:
        if self.teacher is not None and self.teacher.config.vocab_size != model.config.vocab_size:
            raise UndoError(f"oracle_matching: the teacher's vocabulary ({self.teacher.config.vocab_size}) differs from "
                            f"the model's ({model.config.vocab_size}); both must share one tokenizer")

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        loss, logs = torch.zeros(()), {}
        domains = [("forget", o.forget_weight), ("retain", o.retain_weight)]
        teacher_logits, flops = frozen_logits_of_each(self.teacher, [batches[d] for d, _ in domains])
        student_logits = logits_of_each(model, [batches[d] for d, _ in domains])
        for (domain, weight), t_logits, s_logits in zip(domains, teacher_logits, student_logits):
            positions = next_token_positions(batches[domain]["attention_mask"])  # as distillation: not past a row's end
            kl = forward_kl(t_logits, s_logits, positions, o.temperature)
            loss = loss.to(kl.device) + weight * kl
            logs[f"{domain}_kl"] = kl.item()
        return LossOutput(loss, logs, flops)
