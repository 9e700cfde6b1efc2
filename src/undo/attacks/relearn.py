"""The relearning attack: finetune a model on forget-domain data and watch the capability
come back. Robustness is the worst case over learning rates: at each evaluation step, the
best forget performance any learning rate has reached. Each learning rate is a run (a
stage) of its own.

The public code's arithmetic attack trained on add/sub (retain) data by mistake; here the
attack data are the task's forget examples (optionally mixed with retain examples, as the
paper does for arithmetic and WMDP).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import to_dict
from ..data import BatchStream, task_rows
from ..errors import UndoError
from ..models import load_model
from ..tasks import build_task
from ..training import TrainConfig, lm_loss, train
from .base import Attack


@dataclasses.dataclass
class AttackConfig:
    lrs: list[float] = dataclasses.field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    steps: int = 60
    eval_every: int = 10
    batch_size: int = 16
    seq_len: int = 128
    data: Literal["forget", "mixed"] = "forget"
    retain_fraction: float = 0.5        # share of retain examples when data = mixed
    quick_eval: bool = True             # evaluate on the task's quick subset during the attack
    # what each evaluation scores: "all" = task.evaluate (forget and retain metrics); "forget" =
    # the forget items only (Task.score_items: arithmetic's forget_acc exactly, at half the cost;
    # the curve then has no retain metric, which no robustness number uses)
    evaluate: Literal["all", "forget"] = "all"

    def validate(self, where: str) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise UndoError(f"{where}.lrs: give one or more positive learning rates")
        for name in ("steps", "eval_every", "batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UndoError(f"{where}.seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.retain_fraction < 1.0:
            raise UndoError(f"{where}.retain_fraction must be in [0, 1)")

    def train_config(self, lr: float) -> TrainConfig:
        """AdamW, no weight decay, the constant learning rate `lr` from the first step (the
        paper's attack). No warmup: the one warmup step this used to ask for scaled step 0
        by (0 + 1) / 1 = 1, i.e. did nothing, so the numbers are those it always gave and the
        attack's version stays 1 (cached attack runs remain valid)."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=lr,
                           schedule="constant", warmup_steps=0, weight_decay=0.0, eval_every=self.eval_every,
                           checkpoint_every=0)


def attack_examples(task, cfg: AttackConfig, seed: int, forget=None):
    """The attacker's data, shuffled with the seed: `forget` (default: the task's forget
    training examples), mixed with retain examples if asked. With one example per row (padded
    tasks) the attack sees at most steps x batch_size examples, so only those are kept (and
    tokenized): the same random sample of the data, without tokenizing tens of thousands."""
    forget = task.train_examples("forget") if forget is None else forget
    if cfg.data == "forget":
        examples = list(forget)
    else:
        n_retain = int(len(forget) * cfg.retain_fraction / (1 - cfg.retain_fraction))
        retain = list(task.train_examples("retain"))
        random.Random(seed + 1).shuffle(retain)  # a sample of every retain operation, not the first ones
        examples = forget + retain[:n_retain]
    random.Random(seed).shuffle(examples)
    if task.row_format() == "padded":
        examples = examples[: cfg.steps * cfg.batch_size]
    return examples


class Relearn(Attack):
    name = "relearn"
    description = "full finetuning on forget-domain data at each learning rate (worst case over lrs and steps)"
    Options = AttackConfig

    def points(self) -> list[dict[str, Any]]:
        return [{"lr": lr} for lr in self.options.lrs]

    def point_label(self, point: dict[str, Any]) -> str:
        return f"lr{point['lr']:g}"

    def key_options(self) -> dict[str, Any]:
        options = to_dict(self.options)
        options.pop("lrs")  # one run depends on its own learning rate, not on the others of the sweep
        return options

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        cfg = self.options
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        return finetune(task, model, tok, attack_examples(task, cfg, seed), cfg, point["lr"], seed, desc,
                        evaluation(task, tok, cfg))


def evaluation(task, tok, cfg: AttackConfig):
    """The attack's evaluation of a model: the task's (quick) evaluation, or its forget items' score."""
    if cfg.evaluate == "forget":
        items = task.forget_items(cfg.quick_eval)
        return lambda m: task.score_items(m, tok, items)
    return lambda m: task.evaluate(m, tok, quick=cfg.quick_eval)


def finetune(task, model: torch.nn.Module, tok, examples, cfg: AttackConfig, lr: float, seed: int, desc: str,
             evaluate) -> dict[str, Any]:
    """Train `model` (or its adapters: whatever requires grad) on `examples` at `lr`, calling
    `evaluate(model)` every `cfg.eval_every` steps; the attack's sidecar. Shared by the
    finetuning attacks (relearn, relearn_lora, heldout_relearn)."""
    rows = task_rows(tok, task, examples, cfg.seq_len)
    stream = BatchStream(rows, cfg.batch_size, seed=seed + 11, bucket=task.row_format() == "padded")
    result = train(model, lm_loss, {"train": stream}, cfg.train_config(lr), seed=seed, evaluate=evaluate, desc=desc)
    return {"lr": lr, "curve": result.history, "flops": result.flops, "wall_seconds": result.wall_seconds,
            "config": to_dict(cfg)}
