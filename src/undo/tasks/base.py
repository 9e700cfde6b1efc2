"""The task interface: forget/retain data and the metrics that say what a model can do.

A task turns its options into
- training examples for the `forget` and `retain` domains (`Example(prompt, completion)`;
  loss falls on the completion, or on everything for plain text),
- a tokenizer corpus, and
- `evaluate(model, tokenizer)` -> a flat dict of metrics, including the two headline
  numbers every stage and report uses, named by `forget_metric` and `retain_metric`
  (e.g. "forget_acc"/"retain_acc" for arithmetic, "forget_ce"/"retain_ce" for text);
  `higher_is_better` says how to read them (accuracy: True, cross-entropy: False).
New tasks (privacy canaries, fictitious facts, toxicity, bias pairs) implement the same
few methods; extra data a method needs (e.g. "I don't know" answers, sensitive spans)
comes from optional methods a method asks for by name.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

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

    def loss_on(self) -> Literal["completion", "all"]:
        return getattr(self.options, "loss_on", "all")

    def row_format(self) -> Literal["packed", "padded"]:
        """packed: whole examples concatenated into full rows (text); padded: one per row."""
        return getattr(self.options, "row_format", "packed")
