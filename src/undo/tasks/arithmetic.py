"""The arithmetic task of the UNDO paper.

Retain: addition and subtraction, operands 1-50, differences non-negative. Forget:
multiplication and division, operands 1-20, division exact (dividend = divisor x
quotient, both 1-20). Which operations are forgotten is configurable. Two formats:
bare equations `a op b =` and word problems (20 training templates per operation, 5
held out for evaluation). Answers are integers (the paper's code prints division
results as floats, `4.0`; the value is the same, the tokens fewer).

No evaluation prompt ever appears in training: evaluation equations use operand pairs
withheld from the training equations, and evaluation word problems use held-out templates.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UndoError
from ..metrics import completion_ce, greedy_complete
from . import arithmetic_templates as templates
from .base import Domain, Example, Task
from .language import LanguageOptions, LanguageTask, text_metrics

Operation = Literal["addition", "subtraction", "multiplication", "division"]
Format = Literal["equation", "word"]
OPERATIONS: tuple[str, ...] = ("addition", "subtraction", "multiplication", "division")
SYMBOL = {"addition": "+", "subtraction": "-", "multiplication": "*", "division": "/"}


@dataclasses.dataclass
class ArithmeticOptions:
    forget: list[Operation] = dataclasses.field(default_factory=lambda: ["multiplication", "division"])
    retain: list[Operation] = dataclasses.field(default_factory=lambda: ["addition", "subtraction"])
    formats: list[Format] = dataclasses.field(default_factory=lambda: ["equation", "word"])
    retain_max_operand: int = 50
    forget_max_operand: int = 20
    examples_per_operation: int = 6000  # training pool per operation (half equations, half words)
    eval_per_format: int = 100          # evaluation problems per operation and format
    quick_eval_per_format: int = 25     # subset used for early-stop checks
    loss_on: Literal["completion", "all"] = "completion"
    # One problem per row: packed rows let a problem attend to the previous ones, which
    # slows learning a lot for small models (measured: see the issue note).
    row_format: Literal["padded", "packed"] = "padded"
    # Share of training characters that is retain-language text (the paper's base model
    # sees 75% English, 25% arithmetic: 0.75); 0 = arithmetic only. The text is retain data.
    text_fraction: float = 0.0
    text: LanguageOptions = dataclasses.field(default_factory=LanguageOptions)  # the language task's source

    def validate(self, where: str) -> None:
        both = set(self.forget) & set(self.retain)
        if both:
            raise UndoError(f"{where}: {', '.join(sorted(both))} is in both forget and retain; an operation belongs to one side")
        if not self.forget or not self.retain:
            raise UndoError(f"{where}: forget and retain each need at least one operation")
        if not self.formats:
            raise UndoError(f"{where}.formats: give at least one of equation, word")
        for name in ("examples_per_operation", "eval_per_format", "quick_eval_per_format"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if min(self.retain_max_operand, self.forget_max_operand) < 2:
            raise UndoError(f"{where}: operand ranges must reach at least 2")
        if not 0.0 <= self.text_fraction < 1.0:
            raise UndoError(f"{where}.text_fraction must be in [0, 1), got {self.text_fraction}; the paper uses 0.75")


def operand_pairs(op: str, max_operand: int) -> list[tuple[int, int]]:
    r = range(1, max_operand + 1)
    if op == "addition" or op == "multiplication":
        return [(a, b) for a in r for b in r]
    if op == "subtraction":
        return [(a, b) for a in r for b in r if a >= b]
    if op == "division":
        return [(b * q, b) for b in r for q in r]
    raise UndoError(f"unknown operation '{op}'; known: {', '.join(OPERATIONS)}")


def answer(op: str, a: int, b: int) -> int:
    return {"addition": a + b, "subtraction": a - b, "multiplication": a * b, "division": a // b}[op]


def equation(op: str, a: int, b: int) -> Example:
    return Example(f"{a} {SYMBOL[op]} {b} =", f" {answer(op, a, b)}")


def word_problem(template: str, op: str, a: int, b: int) -> Example:
    return Example(template.format(a=a, b=b) + " Answer:", f" {answer(op, a, b)}")


class ArithmeticTask(Task):
    name = "arithmetic"
    Options = ArithmeticOptions

    def __init__(self, options: ArithmeticOptions, seed: int):
        super().__init__(options, seed)
        self._eval: dict[tuple[str, str], list[Example]] = {}
        self._train: dict[str, list[Example]] = {}
        for i, op in enumerate(OPERATIONS):
            if op in options.forget or op in options.retain:
                self._split(op, random.Random(seed * 7919 + i))
        self._text_task = LanguageTask(options.text, seed) if options.text_fraction > 0 else None
        self._text = self._text_examples() if self._text_task is not None else []

    def _text_examples(self) -> list[Example]:
        """Retain-language documents that make up `text_fraction` of all training characters
        (cycling through the source when it is short, i.e. more epochs over the text)."""
        arithmetic_chars = sum(len(ex.prompt) + len(ex.completion) for exs in self._train.values() for ex in exs)
        wanted = self.options.text_fraction / (1 - self.options.text_fraction) * arithmetic_chars
        docs = self._text_task.train_texts("retain")
        text: list[Example] = []
        chars = 0
        while chars < wanted:
            doc = docs[len(text) % len(docs)]
            text.append(Example("", doc))
            chars += len(doc)
        return text

    def domain_of(self, op: str) -> Domain:
        return "forget" if op in self.options.forget else "retain"

    def _split(self, op: str, rng: random.Random) -> None:
        o = self.options
        max_operand = o.forget_max_operand if self.domain_of(op) == "forget" else o.retain_max_operand
        pairs = operand_pairs(op, max_operand)
        rng.shuffle(pairs)
        n_eval = max(1, min(o.eval_per_format, len(pairs) // 4))  # always keep most pairs for training
        eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
        train: list[Example] = []
        for k in range(o.examples_per_operation):
            fmt = o.formats[k % len(o.formats)]
            if fmt == "equation":
                train.append(equation(op, *rng.choice(train_pairs)))
            else:
                train.append(word_problem(rng.choice(templates.TRAIN[op]), op, *rng.choice(pairs)))
        rng.shuffle(train)
        self._train[op] = train
        if "equation" in o.formats:
            self._eval[(op, "equation")] = [equation(op, a, b) for a, b in eval_pairs]
        if "word" in o.formats:
            self._eval[(op, "word")] = [
                word_problem(templates.EVAL[op][k % len(templates.EVAL[op])], op, *rng.choice(pairs))
                for k in range(o.eval_per_format)
            ]

    def train_examples(self, domain: Domain) -> list[Example]:
        ops = self.options.forget if domain == "forget" else self.options.retain
        mixed = [ex for op in ops for ex in self._train[op]] + (self._text if domain == "retain" else [])
        random.Random(self.seed + (1 if domain == "forget" else 2)).shuffle(mixed)
        return mixed

    def eval_examples(self) -> dict[tuple[str, str], list[Example]]:
        return self._eval

    def tokenizer_corpus(self) -> list[str]:
        texts = [ex.prompt + ex.completion for op in self._train for ex in self._train[op]]
        # Held-out templates' words may be unseen in training; the tokenizer must still
        # encode them (a trained byte-level BPE always can; char level sees them here).
        texts += [t.format(a=0, b=0) for op in templates.EVAL for t in templates.EVAL[op]]
        if self._text_task is not None:
            texts += self._text_task.train_texts("retain")
        return texts + [str(d) for d in range(10)]

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quick: bool = False) -> dict[str, float]:
        metrics: dict[str, float] = {}
        per_domain: dict[str, list[float]] = {"forget": [], "retain": []}
        ce_domain: dict[str, list[float]] = {"forget": [], "retain": []}
        limit = self.options.quick_eval_per_format if quick else None
        for (op, fmt), examples in self._eval.items():
            examples = examples[:limit]
            outputs = greedy_complete(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=5)
            acc = sum(out.strip() == ex.completion.strip() for out, ex in zip(outputs, examples)) / len(examples)
            metrics[f"{op}/{fmt}/acc"] = acc
            per_domain[self.domain_of(op)].append(acc)
            if not quick:
                ce = completion_ce(model, tokenizer, examples, loss_on="completion")
                metrics[f"{op}/{fmt}/ce"] = ce
                ce_domain[self.domain_of(op)].append(ce)
        for domain in ("forget", "retain"):
            metrics[f"{domain}_acc"] = sum(per_domain[domain]) / len(per_domain[domain])
            if ce_domain[domain]:
                metrics[f"{domain}_ce"] = sum(ce_domain[domain]) / len(ce_domain[domain])
        if self._text_task is not None and not quick:
            o = self.options.text
            metrics["text_ce"] = text_metrics(model, tokenizer, self._text_task.eval_texts("retain"), o.eval_seq_len,
                                              o.eval_batch_size, where="retain-language evaluation text")["ce"]
        return metrics
