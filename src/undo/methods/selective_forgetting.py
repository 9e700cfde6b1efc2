"""Selective Forgetting (SeUL, Wang et al., 2024): gradient ascent on the sensitive spans only.

L = mean over sensitive tokens t of log p(x_t | x_<t) (minimised: ascent on their CE), the
rest of each sequence untouched. Which tokens are sensitive:
- offline: the spans an annotator marked (the task's `span_rows`; the privacy task marks
  names, dates, addresses, phone numbers, e-mail addresses, IDs and canary secrets);
- online: the `online_fraction` of each sequence's scored tokens the starting model finds
  least likely (its surprising tokens are the ones it had to memorise), chosen once before
  training so the set does not drift as the ascent lowers them.
Each distinct forget sequence once per pass, as in knowledge_unlearning. Optional stop rule
(`stop_rule: unseen`): forget S-MA and S-EL_10 at or below the unseen level; retain term optional.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from ..data import BatchStream
from ..metrics import model_device, token_logprobs
from ..errors import UndoError
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits, logits_of
from .knowledge_unlearning import StopRule, Threshold, below_unseen, distinct_rows


@dataclasses.dataclass
class SelectiveForgettingOptions:
    spans: Literal["offline", "online"] = "offline"
    online_fraction: float = 0.1     # online: share of each sequence's tokens taken as sensitive
    stop_rule: StopRule = "none"     # unseen: stop when forget S-MA and S-EL_10 are at or below the unseen level
    threshold: Threshold = "start"   # as knowledge_unlearning's
    distinct: bool = True
    retain_weight: float = 0.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)
        if not 0 < self.online_fraction <= 1:
            raise UndoError(f"{where}.online_fraction must be in (0, 1], got {self.online_fraction}")


def span_ascent_loss(logits: torch.Tensor, labels: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
    """Mean log p of the scored tokens inside sensitive spans (0 if a batch has none):
    position t predicts token t + 1, so the mask is the tokens' `sensitive` shifted by one."""
    logp, scored = token_logprobs(logits, labels)
    mask = scored & sensitive[:, 1:].bool()
    return (logp * mask).sum() / mask.sum().clamp(min=1)


def least_likely_mask(logp: torch.Tensor, scored: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, T] bool over tokens (index 0 never): per row, the ceil(fraction x scored) scored
    tokens of lowest log-prob. `logp`/`scored` are token_logprobs' [B, T-1] (position t is token t+1)."""
    out = torch.zeros(logp.shape[0], logp.shape[1] + 1, dtype=torch.bool)
    for i in range(logp.shape[0]):
        positions = scored[i].nonzero().squeeze(1)
        k = math.ceil(fraction * len(positions))
        if k:
            lowest = positions[logp[i, positions].argsort()[:k]]
            out[i, lowest + 1] = True
    return out


class SelectiveForgetting(Method):
    name = "selective_forgetting"
    description = "SeUL: gradient ascent on sensitive spans only (marked spans, or the least likely tokens)"
    Options = SelectiveForgettingOptions
    train_defaults = dict(Method.train_defaults, steps=20, lr=5e-5, batch_size=32)
    row_format = "padded"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.levels: dict[str, float] = {}

    def needs(self) -> frozenset[str]:
        return super().needs() | ({"spans"} if self.options.spans == "offline" else frozenset())

    @torch.no_grad()
    def start(self, model, streams) -> None:
        stream = distinct_rows(streams["forget"]) if self.options.distinct else streams["forget"]
        if self.options.spans == "online":  # the starting model's least likely tokens, fixed for the run
            rows, device, masks = dict(stream.rows), model_device(model), []
            for begin in range(0, rows["input_ids"].shape[0], stream.batch_size):
                part = {k: rows[k][begin:begin + stream.batch_size].to(device)
                        for k in ("input_ids", "attention_mask", "labels")}
                logp, scored = token_logprobs(logits_of(model, part), part["labels"])
                masks.append(least_likely_mask(logp.cpu(), scored.cpu(), self.options.online_fraction))
            rows["sensitive"] = torch.cat(masks)
            stream = BatchStream(rows, stream.batch_size, stream.seed, stream.bucket)
        streams["forget"] = stream

    def loss(self, model, batches) -> LossOutput:
        forget = batches["forget"]
        if "sensitive" not in forget:
            raise UndoError("selective_forgetting: the forget batch has no sensitive-token mask; "
                            "run it through the unlearn stage (spans: offline needs task privacy)")
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        loss = span_ascent_loss(forget_logits, forget["labels"], forget["sensitive"])
        out = LossOutput(loss, {"span_logp": loss.item()})
        return self.with_retain(model, batches, out, retain_logits)

    def stop_on_eval(self, metrics: dict[str, float]) -> bool:
        o = self.options
        return o.stop_rule == "unseen" and below_unseen(metrics, ("sma", "sel10"), self.name, self.levels, o.threshold)
