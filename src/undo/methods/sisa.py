"""SISA (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): exact unlearning by retraining
only the models that saw the deleted data, and only from where they first saw it.

Training (before this method runs). The training data (retain + forget: everything the
deployed model learned from) is split into `shards` disjoint shards of a seeded shuffle
(`data.aux_examples`) and each shard into `slices` contiguous slices (`data.slice_examples`).
One model per shard is trained from scratch, incrementally: the slice-r model continues the
slice-(r-1) model on slices 0..r (the paper's incremental training), `slice_train` each,
and every slice's model is kept as a checkpoint. These S x R models are auxiliary models
that the engine trains and caches as stages of their own, one chain per shard
(seed<s>/aux/sisa_s<i>_r<r>-<key>: cached, resumable, shared by recipes that ask for them).

Deletion (this method). The request is the task's forget set, every copy of it. A shard
that holds none is kept bit for bit. A shard whose first slice holding a deleted example is
r* restarts from its checkpoint after slice r*-1 (after r* = 0: the chain's own random init)
and retrains slices r*..R-1 on its slices minus the deleted examples, with the procedure and
seeds of the first training (`data.aux_stream`, the one training loop). The unlearned model
is the ensemble of the S shard models (`undo.ensemble`): its next-token distribution is the
mean of theirs (the paper's vote, for next-token distributions).

Cost (`report()`: the unlearn stage's result.json, "method_report"; its FLOPs, tokens, steps
and wall time are added to the stage's own, so the results store and the report show the
retraining as this model's compute): steps, FLOPs, tokens and examples of the retraining
against a full retrain of every shard from scratch on the remaining data (counted from the
same streams without training), the shards retrained and from which slice; with
`evaluate_before`, the ensemble's metrics before the deletion too.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Optional

from .. import log
from ..config import from_dict, to_dict
from ..data import aux_examples, aux_stream, slice_examples
from ..ensemble import EnsembleForCausalLM
from ..errors import UndoError
from ..models import fresh_copy, non_embedding_params
from ..tasks.base import Example
from ..training import LossOutput, TrainConfig, lm_loss, train
from .base import AuxModel, Method

# Each slice's training, unless `slice_train` says otherwise. Complete, so that the first
# training (aux stages) and the retraining here cannot differ by the experiment's pretrain.
SLICE_TRAIN: dict[str, Any] = dict(steps=40, batch_size=16, seq_len=128, lr=3e-3, schedule="cosine",
                                   warmup_steps=4, checkpoint_every=0)
INIT_SEED = 6  # stages/aux.py starts a "random" auxiliary model as fresh_copy(model, seed + 6)

Slices = list[list[Example]]


@dataclasses.dataclass
class SISAOptions:
    shards: int = 4                 # S disjoint shards, one model each
    slices: int = 4                 # R slices per shard, a checkpoint after each
    slice_train: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig over SLICE_TRAIN
    evaluate_before: bool = True    # also evaluate the ensemble before the deletion (in method_report)

    def validate(self, where: str) -> None:
        for key in ("shards", "slices"):
            if getattr(self, key) < 1:
                raise UndoError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        self.train_config(where)

    def train_config(self, where: str = "method 'sisa' options") -> TrainConfig:
        return from_dict(TrainConfig, {**SLICE_TRAIN, **self.slice_train}, f"{where}.slice_train")


def aux_name(shard: int, slice_: int) -> str:
    return f"sisa_s{shard}_r{slice_}"


def first_affected(shards: list[Slices], deleted: set[Example]) -> dict[int, int]:
    """Shard index -> the first of its slices that holds a deleted example (shards holding none: absent)."""
    out = {}
    for i, slices in enumerate(shards):
        hit = [r for r, part in enumerate(slices) if any(ex in deleted for ex in part)]
        if hit:
            out[i] = hit[0]
    return out


def kept_through(slices: Slices, r: int, deleted: set[Example]) -> list[Example]:
    """What slice r's model trains on: slices 0..r without the deleted examples."""
    return [ex for part in slices[:r + 1] for ex in part if ex not in deleted]


@dataclasses.dataclass
class Cost:
    steps: int = 0
    flops: float = 0.0
    tokens: int = 0
    examples: int = 0               # examples trained on, summed over the slice stages run

    def add(self, steps: int, flops: float, tokens: int, examples: int) -> None:
        self.steps, self.flops = self.steps + steps, self.flops + flops
        self.tokens, self.examples = self.tokens + tokens, self.examples + examples

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SISA(Method):
    name = "sisa"
    description = ("SISA: shard models trained slice by slice; a deletion retrains only the shards that held it, "
                   "from the checkpoint before its slice; predicts with the mean of their distributions")
    Options = SISAOptions
    train_defaults = dict(Method.train_defaults, steps=0)  # nothing goes through the stage's own loop

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.bound: Optional[tuple[Any, Any]] = None                  # (task, tokenizer)
        self.trained_on: dict[tuple[int, int], list[Example]] = {}    # (shard, slice) retrained -> its examples
        self._report: dict[str, Any] = {}

    def aux_models(self) -> dict[str, AuxModel]:
        o = self.options
        # tuples, not lists: AuxModel is hashed
        train = {k: tuple(v) if isinstance(v, list) else v for k, v in to_dict(o.train_config()).items()}
        return {aux_name(i, r): AuxModel("random" if r == 0 else "input", "all", shard=(i, o.shards),
                                         slice=(r, o.slices), train=train, after=aux_name(i, r - 1) if r else None,
                                         quick_eval=True)
                for i in range(o.shards) for r in range(o.slices)}

    def bind_task(self, task: Any, tokenizer: Any) -> None:
        self.bound = (task, tokenizer)

    def loss(self, model, batches) -> LossOutput:
        raise UndoError(f"method '{self.name}' retrains its shard models itself (options.slice_train); "
                        "leave the recipe's train.steps at 0")

    def export(self, model) -> EnsembleForCausalLM:
        """The deletion: retrain the affected shards; the ensemble of all shard models."""
        if self.bound is None:
            raise UndoError("method 'sisa' needs the task's examples; run it through the unlearn stage")
        task, tok = self.bound
        o, t0 = self.options, time.time()
        deleted = set(task.train_examples("forget"))
        shards = [slice_examples(aux_examples(task, "all", (i, o.shards), self.seed), o.slices)
                  for i in range(o.shards)]
        first = first_affected(shards, deleted)
        log.say(f"sisa: the forget set is in {len(first)} of {o.shards} shards; retraining "
                f"{sum(o.slices - r for r in first.values())} of {o.shards * o.slices} slice models")
        before = self._evaluate_before(task, tok) if o.evaluate_before else None
        t1, cost = time.time(), Cost()
        members = [self._retrain(i, first[i], shards[i], deleted, model, cost) if i in first
                   else self.aux[aux_name(i, o.slices - 1)] for i in range(o.shards)]
        full = self._full_retrain_cost(shards, deleted, members[0])
        self._report = self._make_report(shards, deleted, first, cost, full, before, time.time() - t1)
        share = self._report["sisa"]["retrain_fraction"]["flops"]
        log.say(f"sisa: retrained {cost.steps} of {full.steps} steps ({share:.2f} of a full retrain's FLOPs) "
                f"in {time.time() - t0:.0f}s")
        return EnsembleForCausalLM.from_members(members)

    def report(self) -> dict[str, Any]:
        return self._report

    def _evaluate_before(self, task: Any, tok: Any) -> dict[str, float]:
        last = self.options.slices - 1
        ensemble = EnsembleForCausalLM.from_members([self.aux[aux_name(i, last)] for i in range(self.options.shards)])
        return task.evaluate(ensemble, tok)

    def _retrain(self, shard: int, first: int, slices: Slices, deleted: set[Example], base, cost: Cost):
        """Shard `shard` from its checkpoint before slice `first`, slice by slice, without the deleted examples."""
        task, tok = self.bound
        cfg = self.options.train_config()
        if first == 0:  # the chain's own random start, as the aux stage made it
            model = fresh_copy(base, seed=self.seed + INIT_SEED).to(base.device)
        else:
            model = copy.deepcopy(self.aux[aux_name(shard, first - 1)])
        model.requires_grad_(True)
        for r in range(first, len(slices)):
            kept = kept_through(slices, r, deleted)
            self.trained_on[(shard, r)] = kept
            if not kept:  # every example so far was deleted: nothing to learn from yet
                continue
            stream = aux_stream(tok, task, kept, cfg.batch_size, cfg.seq_len, self.seed)
            result = train(model, lm_loss, {"train": stream}, cfg, seed=self.seed,
                           desc=f"sisa: retrain shard {shard + 1} slice {r + 1}")
            cost.add(result.steps, result.flops, result.tokens, len(kept))
        return model.requires_grad_(False).eval()

    def _full_retrain_cost(self, shards: list[Slices], deleted: set[Example], member) -> Cost:
        """What retraining every shard from scratch on the remaining data would cost, counted from
        the very streams it would train on (training.py's count: 6 x params x tokens)."""
        task, tok = self.bound
        cfg = self.options.train_config()
        full = Cost()
        for slices in shards:
            for r in range(len(slices)):
                kept = kept_through(slices, r, deleted)
                if not kept:
                    continue
                stream = aux_stream(tok, task, kept, cfg.batch_size, cfg.seq_len, self.seed)
                full.add(cfg.steps, 0.0, sum(stream.batch(k)["input_ids"].numel() for k in range(cfg.steps)), len(kept))
        full.flops = 6.0 * non_embedding_params(member) * full.tokens
        return full

    def _make_report(self, shards: list[Slices], deleted: set[Example], first: dict[int, int], cost: Cost,
                     full: Cost, before: Optional[dict[str, float]], seconds: float) -> dict[str, Any]:
        ratio = {k: (getattr(cost, k) / getattr(full, k) if getattr(full, k) else 0.0)
                 for k in ("steps", "flops", "tokens", "examples")}
        sisa = {"shards": self.options.shards, "slices": self.options.slices,
                "deleted_examples": sum(ex in deleted for slices in shards for part in slices for ex in part),
                "retrained_from_slice": {str(i): r for i, r in sorted(first.items())},
                "kept_shards": [i for i in range(self.options.shards) if i not in first],
                "retrain": cost.as_dict(), "full_retrain": full.as_dict(), "retrain_fraction": ratio}
        if before is not None:
            sisa["metrics_before_deletion"] = before
        return {"flops": cost.flops, "tokens": cost.tokens, "steps": cost.steps, "wall_seconds": seconds, "sisa": sisa,
                "metrics": {"deletion_cost": ratio["flops"]}}
