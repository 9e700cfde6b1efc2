"""Knowledge Unlearning (Jang et al., ACL 2023): gradient ascent on the forget sequences until
they are no better remembered than text the model never saw.

L = -CE(forget sequences), one sequence per row. The paper unlearns s = 32 sequences at once
(the effective batch is the forget set: one update per epoch), at most 20 epochs, lr 5e-5,
and stops once the forget set's mean MA and mean EL_10 are both below their values on
unseen text (fixed thresholds, measured on the starting model). Here the stop rule reads the
task's quick evaluation every `eval_every` steps (the privacy task reports forget_/unseen_ ma
and el10): `threshold: start` takes the unseen level of the first evaluation (step 0, the
starting model; after a resume, the first one after it), `current` the level of the model
being unlearned at each check; the forget set must be at or below it (a tiny model's unseen
EL_10 is often 0, which a strict "below" never reaches). Each forget sequence is ascended
once per pass: the forget stream's repeated rows (a canary trained 64 times is 64 rows)
are kept once (`distinct`). For the paper's setup set batch_size to the number of distinct
forget sequences. Optional retain term (retain_weight, default 0 as in the paper).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..data import BatchStream
from ..errors import UndoError
from ..metrics import masked_ce
from ..training import LossOutput
from .base import Method, RetainLoss, check_weights, forget_and_retain_logits

StopRule = Literal["unseen", "none"]
Threshold = Literal["start", "current"]


@dataclasses.dataclass
class KnowledgeUnlearningOptions:
    stop_rule: StopRule = "unseen"   # unseen: stop when forget MA and EL_10 are at or below the unseen level
    threshold: Threshold = "start"   # the unseen level of the starting model (Jang et al.) or of the current one
    distinct: bool = True            # ascend each distinct forget sequence once per pass
    retain_weight: float = 0.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)


def distinct_rows(stream: BatchStream) -> BatchStream:
    """The stream with each distinct row once (the first copy; every other field follows it)."""
    first: dict[tuple[int, ...], int] = {}
    for i, row in enumerate(stream.rows["input_ids"].tolist()):
        first.setdefault(tuple(row), i)
    keep = sorted(first.values())
    rows = {k: v[keep] for k, v in stream.rows.items()}
    return BatchStream(rows, stream.batch_size, stream.seed, stream.bucket)


def below_unseen(metrics: dict[str, float], keys: tuple[str, ...], method: str, levels: dict[str, float],
                 threshold: Threshold) -> bool:
    """Jang et al.'s rule: every `forget_<key>` at or below the unseen level of `key`: `levels`
    (filled from the first metrics seen, with threshold "start") or the current `unseen_<key>`."""
    wanted = [f"{side}_{k}" for k in keys for side in ("forget", "unseen")]
    missing = [k for k in wanted if k not in metrics]
    if missing:
        raise UndoError(f"method '{method}': its stop rule needs {', '.join(missing)} from the task's quick "
                        f"evaluation (task privacy reports them); use task privacy or set options.stop_rule: none")
    if threshold == "current" or not levels:
        levels.update({k: metrics[f"unseen_{k}"] for k in keys})
    return all(metrics[f"forget_{k}"] <= levels[k] for k in keys)


class KnowledgeUnlearning(Method):
    name = "knowledge_unlearning"
    description = "gradient ascent on forget sequences until their MA and EL_10 fall below the unseen level"
    Options = KnowledgeUnlearningOptions
    # The paper: lr 5e-5, s = 32 sequences per update, at most 20 epochs, the rule checked each epoch.
    train_defaults = dict(Method.train_defaults, steps=20, lr=5e-5, batch_size=32, eval_every=1)
    row_format = "padded"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.levels: dict[str, float] = {}  # the stop rule's unseen level (threshold: start)

    def start(self, model, streams) -> None:
        if self.options.distinct:
            streams["forget"] = distinct_rows(streams["forget"])

    def loss(self, model, batches) -> LossOutput:
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        ce = masked_ce(forget_logits, batches["forget"]["labels"])
        return self.with_retain(model, batches, LossOutput(-ce, {"forget_ce": ce.item()}), retain_logits)

    def stop_on_eval(self, metrics: dict[str, float]) -> bool:
        o = self.options
        return o.stop_rule == "unseen" and below_unseen(metrics, ("ma", "el10"), self.name, self.levels, o.threshold)
