"""Leave-one-out ensemble (Liu & Kalinli, 2023): forget a sequence by moving the model toward
teachers that never saw it.

M teachers are trained from scratch on M disjoint shards of the training data (retain +
forget; auxiliary models that the engine trains and caches; the shards are `data.aux_examples`,
the very split the aux stage trains on). For a forget sequence x, S(x) = the teachers whose
shard holds no copy of x, and at each position t the target is their mean next-token
distribution; the model being unlearned is finetuned on x toward it:

    q_t = (1/|S(x)|) sum_{j in S(x)} p_j(. | x_<t)
    L   = mean over the batch's scored positions t of KL(q_t || p_theta(. | x_<t))

(the reference's sum over t as a mean over scored tokens: only the step size's scale differs),
plus an optional retain term (retain_weight, default 0: the reference has none). Each distinct
forget sequence once per pass. A sequence repeated so often that every shard holds a copy
(a canary trained 64 times, over 4 shards) has no teacher that never saw it: it is left out,
with a warning. The number of teachers M is not given by the reference (inferred: 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from .. import log
from ..data import BatchStream, aux_examples
from ..errors import UndoError
from ..losses import forward_kl, scored_positions
from ..tasks.base import Example
from ..training import LossOutput
from .base import AuxModel, Method, RetainLoss, check_weights, forget_and_retain_logits, frozen_logits
from .knowledge_unlearning import distinct_rows


@dataclasses.dataclass
class LOOEnsembleOptions:
    teachers: int = 4                    # M disjoint shards, one teacher each
    # TrainConfig fields over the experiment's pretrain (a teacher trains as the base did, on its shard)
    teacher_train: dict[str, Any] = dataclasses.field(default_factory=dict)
    retain_weight: float = 0.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        if self.teachers < 2:
            raise UndoError(f"{where}.teachers must be at least 2 (the shard that saw a sequence and one "
                            f"that did not), got {self.teachers}")
        check_weights(where, retain_weight=self.retain_weight)


def shard_holders(forget: list[Example], shards: list[list[Example]]) -> list[frozenset[int]]:
    """For each forget example, the indices of the shards that hold a copy of it."""
    where: dict[Example, set[int]] = {}
    for index, shard in enumerate(shards):
        for ex in shard:
            where.setdefault(ex, set()).add(index)
    return [frozenset(where.get(ex, ())) for ex in forget]


def never_saw(holders: list[frozenset[int]], count: int) -> torch.Tensor:
    """[examples, count] bool: teacher j never saw example i (no copy in its shard)."""
    return torch.tensor([[j not in held for j in range(count)] for held in holders], dtype=torch.bool)


def leave_out_logprobs(teacher_logits: list[torch.Tensor], use: torch.Tensor) -> torch.Tensor:
    """log q [B, T, V] (float32): per row b, the log of the mean of softmax(teacher_logits[j][b]) over
    the teachers j with use[b, j]. A row with no teacher gets 0 (it must be masked out of the loss)."""
    log_q = torch.full_like(teacher_logits[0], float("-inf"), dtype=torch.float32)
    for j, logits in enumerate(teacher_logits):
        log_p = F.log_softmax(logits.float(), -1)
        log_q = torch.where(use[:, j, None, None], torch.logaddexp(log_q, log_p), log_q)
    has = use.any(1)[:, None, None]
    return torch.where(has, log_q - use.sum(1).clamp(min=1).float().log()[:, None, None], 0.0)


class LOOEnsemble(Method):
    name = "loo_ensemble"
    description = "KL toward the mean next-token distribution of the shard teachers that never saw each sequence"
    Options = LOOEnsembleOptions
    train_defaults = dict(Method.train_defaults, steps=30, lr=3e-4)
    row_format = "padded"  # one example per row: forget row i is forget example i, whose teachers we know

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holders: list[frozenset[int]] = []  # per forget example: the shards holding a copy
        self.use = torch.zeros(0, 0, dtype=torch.bool)  # [examples, M]: teacher j never saw example i

    def aux_models(self) -> dict[str, AuxModel]:
        # From scratch: a teacher started from the model being unlearned would have seen everything.
        m = self.options.teachers
        return {f"teacher{i}": AuxModel("random", "all", (i, m), train=dict(self.options.teacher_train))
                for i in range(m)}

    def bind_task(self, task, tokenizer) -> None:
        m = self.options.teachers
        shards = [aux_examples(task, "all", (i, m), self.seed) for i in range(m)]
        self.holders = shard_holders(task.train_examples("forget"), shards)

    def start(self, model, streams) -> None:
        stream = streams["forget"]
        if stream.n != len(self.holders):
            raise UndoError(f"loo_ensemble: {stream.n} forget rows but {len(self.holders)} forget examples; "
                            f"it needs one example per row, run through the unlearn stage")
        self.use = never_saw(self.holders, self.options.teachers)
        # [n, 1]: each row's example index (a [n, M] mask would be cut to the batch's width)
        rows = {**stream.rows, "example": torch.arange(stream.n)[:, None]}
        distinct = distinct_rows(BatchStream(rows, stream.batch_size, stream.seed, stream.bucket))
        keep = self.use[distinct.rows["example"][:, 0]].any(1)
        if not keep.any():
            raise UndoError("loo_ensemble: every forget sequence is in every teacher's shard (repeated copies), "
                            "so no teacher never saw one; use more teachers (options.teachers)")
        if not keep.all():
            log.warn(f"loo_ensemble: {int((~keep).sum())} of {len(keep)} distinct forget sequences have a copy in "
                     f"every teacher's shard (repeated ones); no teacher never saw them, so they are left out")
        rows = {k: v[keep] for k, v in distinct.rows.items()}
        streams["forget"] = BatchStream(rows, stream.batch_size, stream.seed, stream.bucket)

    def loss(self, model, batches) -> LossOutput:
        forget = batches["forget"]
        if "example" not in forget:
            raise UndoError("loo_ensemble: the forget batch does not say which example each row is; "
                            "run it through the unlearn stage (it calls bind_task and start)")
        use = self.use[forget["example"][:, 0].cpu()].to(forget["input_ids"].device)
        present = [j for j in range(self.options.teachers) if use[:, j].any()]  # the others are not run
        teachers = [frozen_logits(self.aux[f"teacher{j}"], forget) for j in present]
        target = leave_out_logprobs([logits for logits, _ in teachers], use[:, present])
        flops = sum(f for _, f in teachers)
        student, retain_logits = forget_and_retain_logits(self, model, batches)
        mask = scored_positions(forget["labels"]) & use.any(1)[:, None]
        kl = forward_kl(target, student, mask)
        return self.with_retain(model, batches, LossOutput(kl, {"loo_kl": kl.item()}, flops), retain_logits)
