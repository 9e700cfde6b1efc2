"""The task interface: forget/retain data and the metrics that say what a model can do.

A task turns its options into
- training examples for the `forget` and `retain` domains (`Example(prompt, completion)`;
  loss falls on the completion, or on everything for plain text),
- a tokenizer corpus, and
- `evaluate(model, tokenizer)` -> a flat dict of metrics, including the two headline
  numbers every stage and report uses, named by `forget_metric` and `retain_metric`
  (e.g. "forget_acc"/"retain_acc" for arithmetic, "forget_ce"/"retain_ce" for text);
  `higher_is_better` says how to read them (accuracy: True, cross-entropy: False);
- optionally `quality_gate(metrics, data)`: what a pretrained base (or oracle) must reach
  for the experiment to mean anything (pretraining trains longer, fails or marks the run).
New tasks (privacy canaries, fictitious facts, toxicity, bias pairs) implement the same
few methods; extra data a method needs (e.g. "I don't know" answers, sensitive spans)
comes from optional methods a method asks for by name.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UndoError

Domain = Literal["forget", "retain"]


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


class Task(abc.ABC):
    """Base class for tasks. Subclasses set `name`, `Options` and implement the methods."""

    name: ClassVar[str]
    Options: ClassVar[type]
    # The headline metrics (keys of `evaluate`'s dict) and how to read them.
    forget_metric: ClassVar[str] = "forget_acc"
    retain_metric: ClassVar[str] = "retain_acc"
    higher_is_better: ClassVar[bool] = True
    metric_label: ClassVar[str] = "exact-match accuracy"
    # Part of every cache key: bump it when the task's data or metrics change meaning.
    version: ClassVar[int] = 1
    # Further `evaluate` keys the report tabulates for every model (mean [min, max] over graph
    # seeds), beside what `versus_oracle` adds; a key no model has is left out.
    report_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, seed: int):
        self.options = options
        self.seed = seed

    @abc.abstractmethod
    def train_examples(self, domain: Domain) -> list[Example]:
        """The training examples of one domain, in a seeded order."""

    @abc.abstractmethod
    def tokenizer_corpus(self) -> list[str]:
        """Text a tokenizer for this task is trained on."""

    @abc.abstractmethod
    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quick: bool = False) -> dict[str, float]:
        """All metrics; `quick` evaluates a small subset (used for early-stop checks)."""

    def quality_gate(self, metrics: dict[str, float], data: Literal["all", "retain"]) -> list[str]:
        """The task's quality gate on a starting model: what a model trained on `data` ("all":
        the base, retain + forget; "retain": the oracle) must reach before unlearning it means
        anything. Returns the checks `metrics` (from `evaluate`) missed, one short phrase each
        ("multiplication/equation acc 0.71 < 0.90"); empty when the model passes. Default: no gate."""
        return []

    @classmethod
    def versus_oracle(cls, metrics: dict[str, float], oracle_metrics: dict[str, float]) -> dict[str, float]:
        """A model's metrics that need the oracle's of the same graph seed (MUSE's PrivLeak,
        TOFU's forget quality), from both `evaluate` dicts; the report adds them, and leaves them out
        where this raises an UndoError (e.g. a quick evaluation lacks what they need). Default: none."""
        return {}

    def loss_on(self) -> Literal["completion", "all"]:
        return getattr(self.options, "loss_on", "all")

    def row_format(self) -> Literal["packed", "padded"]:
        """packed: whole examples concatenated into full rows (text); padded: one per row."""
        return getattr(self.options, "row_format", "packed")

    # --- what attacks other than relearning need (optional: a task without them cannot be
    #     attacked by `heldout_relearn` or `fewshot`, and says so) ---------------------------
    def forget_items(self, quick: bool = False) -> dict[str, list[Example]]:
        """The forget-domain items `evaluate` scores, by group (e.g. one per operation and
        format); `score_items` of them gives `evaluate`'s `forget_metric` (arithmetic: exactly;
        text: per document, one per row, where `evaluate` packs rows)."""
        raise self._unsupported("forget_items")

    def score_items(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    groups: dict[str, list[Example]]) -> dict[str, float]:
        """The forget metric of these items: `forget_metric` (the mean over groups, as
        `evaluate` computes it) and one score per group. The prompts may be longer than
        `evaluate`'s (in-context examples before them); only the completions are scored."""
        raise self._unsupported("score_items")

    def forget_halves(self) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
        """Two disjoint halves of the forget set's facts, by group, each with the examples
        of its facts (Deeb & Roger's retraining on the other half): an attacker trains on one
        and is measured on the other. No fact (e.g. an operand pair) is in both halves."""
        raise self._unsupported("forget_halves")

    def fewshot_pool(self, group: str) -> list[Example]:
        """Forget training examples an in-context prompt for an item of `group` draws from."""
        return self.train_examples("forget")

    def fewshot_separator(self) -> str:
        """What joins in-context examples to each other and to the prompt."""
        return "\n"

    def _unsupported(self, what: str) -> UndoError:
        return UndoError(f"task '{self.name}' does not provide {what}(), which this attack needs; "
                         f"use a task that does (arithmetic, language) or add it to the task")
