"""The task interface: forget/retain data and the metrics that say what a model can do.

A task turns its options into
- training examples for the `forget` and `retain` domains (`Example(prompt, completion)`;
  loss falls on the completion, or on everything for plain text),
- a tokenizer corpus, and
- `evaluate(model, tokenizer)` -> a flat dict of metrics, including the two headline
  numbers every stage and report uses: `forget_score` and `retain_score` (higher = the
  model has more of that capability, e.g. exact-match accuracy, or -CE for text).
New tasks (privacy canaries, fictitious facts, toxicity, bias pairs) implement the same
few methods; extra data a method needs (e.g. "I don't know" answers, sensitive spans)
comes from optional methods a method asks for by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

Domain = Literal["forget", "retain"]


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


class Task:
    """Base class for tasks. Subclasses set `name`, `Options` and implement the methods."""

    name: ClassVar[str]
    Options: ClassVar[type]
    # Which metric the report calls forget/retain performance, and how to read it.
    score_label: ClassVar[str] = "accuracy"

    def __init__(self, options: Any, seed: int):
        self.options = options
        self.seed = seed

    def train_examples(self, domain: Domain) -> list[Example]:
        raise NotImplementedError

    def tokenizer_corpus(self) -> list[str]:
        raise NotImplementedError

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quick: bool = False) -> dict[str, float]:
        """All metrics; `quick` evaluates a small subset (used for early-stop checks)."""
        raise NotImplementedError

    def loss_on(self) -> Literal["completion", "all"]:
        return getattr(self.options, "loss_on", "all")
