"""Retraining on other forget facts (Deeb & Roger, "Do unlearning methods remove information
from language model weights?": RTT). The task splits its forget set into two disjoint halves
(`Task.forget_halves`: no fact in both); the attacker finetunes on one half and is measured
on the other, which it never sees. What comes back on the unseen half was still in the
weights (or is generalisation the oracle shows too: compare with the oracle's row), not
relearned from the attack data.

The curve's `forget_metric` (e.g. forget_acc) is the unseen half's score, so the worst case
over lrs and steps reads as for relearning; `seen/<metric>` is the trained half's, per group
too. Options are relearning's (lrs, steps, data: forget = the trained half, mixed = with
retain examples) plus how many items per group are scored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import UndoError
from ..models import load_model
from ..tasks import build_task
from .relearn import AttackConfig, Relearn, attack_examples, finetune


@dataclasses.dataclass
class HeldoutConfig(AttackConfig):
    eval_per_group: int = 50            # items scored per group and half with quick_eval (else every item)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.eval_per_group < 1:
            raise UndoError(f"{where}.eval_per_group must be at least 1, got {self.eval_per_group}")


def halves(task) -> tuple[dict[str, list], dict[str, list]]:
    """The task's (trained, unseen) halves, checked disjoint: a task that leaks a fact into
    both halves would make the attack measure relearning, not what stayed in the weights."""
    seen, unseen = task.forget_halves()
    trained = {ex for exs in seen.values() for ex in exs}
    shared = [ex for exs in unseen.values() for ex in exs if ex in trained]
    if shared:
        raise UndoError(f"task '{task.name}': its forget halves share {len(shared)} example(s) "
                        f"(e.g. {shared[0].prompt!r}); they must be disjoint")
    return seen, unseen


class HeldoutRelearn(Relearn):
    name = "heldout_relearn"
    description = "finetune on one half of the forget facts, measure the other, unseen half (Deeb & Roger's RTT)"
    Options = HeldoutConfig

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        cfg = self.options
        task = build_task(exp.task, exp.seed)
        seen, unseen = halves(task)
        limit = cfg.eval_per_group if cfg.quick_eval else None
        seen_eval = {g: exs[:limit] for g, exs in seen.items() if exs}
        unseen_eval = {g: exs[:limit] for g, exs in unseen.items() if exs}
        model, tok = load_model(model_dir)

        def evaluate(m) -> dict[str, float]:
            out = task.score_items(m, tok, unseen_eval)
            out.update({f"seen/{k}": v for k, v in task.score_items(m, tok, seen_eval).items()})
            return out

        examples = attack_examples(task, cfg, seed, forget=[ex for exs in seen.values() for ex in exs])
        return {**finetune(task, model, tok, examples, cfg, point["lr"], seed, desc, evaluate),
                "halves": {"trained": sum(map(len, seen.values())), "unseen": sum(map(len, unseen.values()))}}
