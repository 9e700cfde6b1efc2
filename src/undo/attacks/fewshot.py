"""The few-shot attack: put k solved examples of the forget task before each forget
question and see whether the model answers (in-context relearning; the UNDO paper's
reading list and Lucki et al. use k up to 16). No weight changes.

Shots are drawn from the task's forget *training* examples of the item's group
(`Task.fewshot_pool`: same operation and format for arithmetic), never from the evaluation
items, seeded by the attack seed and the item; the k-shot prompt of an item holds the first k
of one drawn sequence, so k = 1, 4, 16 are nested. Shots are joined by `Task.fewshot_separator` (a space
where the tokenizer cannot encode a newline). A prompt longer than `max_context` tokens (or
the model's positions) loses its earliest shots; the curve's `shots_used` says how many were
left on average. The curve has one entry per k, at step k (k = 0 is the model unattacked),
scored by `Task.score_items` (the task's forget metric; for text, cross-entropy of each
document after its shots).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..errors import UndoError
from ..models import load_model
from ..tasks import build_task
from ..tasks.base import Example
from ..tokenization import encode
from .base import Attack


@dataclasses.dataclass
class FewshotConfig:
    shots: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 4, 16])
    max_context: int = 512              # prompt + answer tokens; earliest shots dropped beyond it
    quick_eval: bool = False            # score the task's quick subset of forget items

    def validate(self, where: str) -> None:
        if not self.shots or any(k < 0 for k in self.shots):
            raise UndoError(f"{where}.shots: give one or more numbers of examples >= 0 (e.g. [0, 1, 4, 16])")
        if self.max_context < 8:
            raise UndoError(f"{where}.max_context must be at least 8 tokens, got {self.max_context}")


def separator(task, tok) -> str:
    sep = task.fewshot_separator()
    return sep if tok.decode(encode(tok, sep)) == sep else " "


def fewshot_groups(task, tok, k: int, seed: int, max_tokens: int, quick: bool = False,
                   ) -> tuple[dict[str, list[Example]], float]:
    """The forget items with k shots before each prompt, by group, and the mean number of
    shots left after fitting `max_tokens`."""
    sep = separator(task, tok)
    groups, used = {}, []
    for group, items in task.forget_items(quick).items():
        # Never an evaluation item, nor its question with another answer or without the header a
        # scored prompt starts with (a WMDP shot is its question minus the header); text: prompts are empty.
        asked = [ex.prompt for ex in items if ex.prompt]
        pool = [ex for ex in task.fewshot_pool(group)
                if ex not in items and not (ex.prompt and any(p.endswith(ex.prompt) for p in asked))]
        if k and not pool:
            raise UndoError(f"fewshot: task '{task.name}' has no forget training examples for group '{group}'")
        out = []
        for i, item in enumerate(items):
            rng = random.Random(f"{seed}-{group}-{i}")
            drawn = [rng.choice(pool) for _ in range(k)]  # with replacement: k may exceed a small pool
            budget = max_tokens - len(encode(tok, item.prompt + item.completion)) - 1
            while drawn and len(encode(tok, sep.join(s.prompt + s.completion for s in drawn) + sep)) > budget:
                drawn = drawn[1:]
            context = sep.join(s.prompt + s.completion for s in drawn) + sep if drawn else ""
            out.append(Example(context + item.prompt, item.completion))
            used.append(len(drawn))
        groups[group] = out
    return groups, sum(used) / max(len(used), 1)


class Fewshot(Attack):
    name = "fewshot"
    description = "k solved forget examples in the prompt (k = 0, 1, 4, 16), no weight change"
    Options = FewshotConfig
    version = 2  # 2: a shot is never a scored question's prompt's ending (arithmetic: "3 * 4 =" is no shot when "13 * 4 =" is scored)

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        start = time.time()
        cfg = self.options
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        max_tokens = min(cfg.max_context, getattr(model.config, "max_position_embeddings", None) or cfg.max_context)
        curve = []
        for k in sorted(set(cfg.shots)):
            groups, used = fewshot_groups(task, tok, k, seed, max_tokens, cfg.quick_eval)
            curve.append({"step": k, **task.score_items(model, tok, groups), "shots_used": used})
        return {"curve": curve, "flops": 0.0, "wall_seconds": time.time() - start, "config": to_dict(cfg)}
