"""LLMU (Yao, Xu & Liu, "Large Language Model Unlearning", NeurIPS 2023).

L = f * L_fgt + r * L_rdn + a * L_nor, the paper's weights f = 0.5, r = 1, a = 1:
- L_fgt = -CE on the forget answers (gradient ascent);
- L_rdn = CE of random answers after the forget questions: each forget row's question
  (its tokens before the first scored one) followed by the answer tokens of a randomly drawn
  row of normal data (`random_answers: retain`, the paper's random TruthfulQA responses) or
  of another forget row (`forget`: a random derangement within the batch). A row without a
  question (plain text: nothing unscored after BOS) gets none; with no such row the term is 0;
- L_nor = KL(p_original || p) on the normal data's scored tokens, the original being the
  model before unlearning (the paper writes -sum p_orig log p: the same gradient); `nll`
  (CE on retain) is the usual variant.
Stop rule: training ends after the first step whose forget CE (L_fgt before its sign flip)
exceeds `max_forget_ce`. The public code compares the negated (ascent) loss to its bound
(100), which it can never exceed, so it always ran the whole budget. Default bound:
ln(vocabulary size), the CE of a uniform guess: past it the ascent only breaks the model.
The paper: lr 2e-6, 1000 steps, batch 2 on OPT-1.3B / 2.7B and Llama-2-7B."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch

from ..data import IGNORE
from ..errors import UndoError
from ..metrics import masked_ce
from ..training import LossOutput
from .base import Batch, Method, RetainLoss, check_weights, logits_of_each, retain_needs


@dataclasses.dataclass
class LLMUOptions:
    forget_weight: float = 0.5
    random_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "kl"
    random_answers: Literal["retain", "forget"] = "retain"
    max_answer_tokens: int = 64                # a random answer longer than this is cut (normal text rows)
    max_forget_ce: Optional[float] = None      # stop bound on the forget CE; None: ln(vocabulary size)

    def validate(self, where: str) -> None:
        check_weights(where, forget_weight=self.forget_weight, random_weight=self.random_weight,
                      retain_weight=self.retain_weight)
        if self.max_answer_tokens < 1:
            raise UndoError(f"{where}.max_answer_tokens must be at least 1, got {self.max_answer_tokens}")
        if self.max_forget_ce is not None and not self.max_forget_ce > 0:
            raise UndoError(f"{where}.max_forget_ce must be > 0 (or null for ln(vocabulary size)), got {self.max_forget_ce}")


def question_lengths(batch: Batch) -> list[int]:
    """Per row, the tokens before its first scored one (BOS + question; the row's length if none is scored)."""
    scored = batch["labels"] != IGNORE
    lengths = batch["attention_mask"].sum(1)
    first = torch.where(scored.any(1), scored.int().argmax(1), lengths)
    return first.tolist()


def answers_of(batch: Batch, cap: int) -> list[list[int]]:
    """Per row, its scored tokens (the answer, EOS included), at most `cap` of them."""
    ids, scored = batch["input_ids"], batch["labels"] != IGNORE
    return [ids[r][scored[r]][:cap].tolist() for r in range(ids.shape[0])]


def random_answer_batch(forget: Batch, pool: Optional[Batch], cap: int) -> Optional[Batch]:
    """Forget questions, each followed by a random answer: of a row of `pool` (drawn with
    replacement), or with `pool` None of another forget row (a random cyclic derangement).
    Rows are right-padded; only the answer tokens are scored. None when no forget row has a
    question (or, within forget, fewer than two do). Draws from the torch RNG, which the
    training loop seeds and checkpoints."""
    lengths = question_lengths(forget)
    asked = [r for r, n in enumerate(lengths) if n >= 2]  # more than BOS before the answer
    own = answers_of(forget, cap)
    if pool is None:
        if len(asked) < 2:
            return None
        order = torch.randperm(len(asked)).tolist()
        answer_of = {asked[order[k]]: own[asked[order[(k + 1) % len(order)]]] for k in range(len(order))}
    else:
        candidates = [a for a in answers_of(pool, cap) if a]
        if not asked or not candidates:
            return None
        draws = torch.randint(len(candidates), (len(asked),)).tolist()
        answer_of = {r: candidates[d] for r, d in zip(asked, draws)}
    rows = [(forget["input_ids"][r][:lengths[r]].tolist(), answer_of[r]) for r in asked]
    width = max(len(q) + len(a) for q, a in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (question, answer) in enumerate(rows):
        ids[i, :len(question) + len(answer)] = torch.tensor(question + answer)
        labels[i, len(question):len(question) + len(answer)] = torch.tensor(answer)
        attention[i, :len(question) + len(answer)] = 1
    device = forget["input_ids"].device
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


class LLMU(Method):
    name = "llmu"
    description = ("LLM unlearning (Yao et al.): 0.5 x ascent on forget answers + CE of random answers to forget "
                   "questions + KL to the original on normal data; stops once the forget CE passes a bound")
    Options = LLMUOptions
    row_format = "padded"  # a row is one question and its answer

    def __init__(self, options: LLMUOptions, task: Optional[str] = None, seed: int = 0):
        super().__init__(options, task, seed)
        self.stop_bound: Optional[float] = options.max_forget_ce

    def needs(self) -> frozenset[str]:
        o = self.options
        pool = {"retain"} if o.random_answers == "retain" and o.random_weight else set()
        return frozenset({"forget"} | pool) | retain_needs(o.retain_loss, o.retain_weight)

    def prepare(self, model) -> None:
        if self.options.max_forget_ce is None:
            self.stop_bound = math.log(model.config.vocab_size)

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        random_rows = None
        if o.random_weight:
            pool = batches["retain"] if o.random_answers == "retain" else None
            random_rows = random_answer_batch(forget, pool, o.max_answer_tokens)
        parts = [forget] + ([random_rows] if random_rows is not None else [])
        parts += [batches["retain"]] if o.retain_weight else []
        logits = logits_of_each(model, parts)
        forget_ce = masked_ce(logits[0], forget["labels"])
        loss = -o.forget_weight * forget_ce
        logs = {"forget_ce": forget_ce.item()}
        if random_rows is not None:
            random_ce = masked_ce(logits[1], random_rows["labels"])
            loss = loss + o.random_weight * random_ce
            logs["random_ce"] = random_ce.item()
        out = LossOutput(loss, logs)
        return self.with_retain(model, batches, out, logits[-1] if o.retain_weight else None)

    def stop_after_step(self, logs: dict[str, float]) -> bool:
        if self.stop_bound is None:
            raise UndoError("llmu: the stop bound is unset; call prepare(model) before training (the stage does)")
        return logs.get("forget_ce", 0.0) > self.stop_bound
