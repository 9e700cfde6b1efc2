"""The fair-classification task: toxic / non-toxic sentences about one of two made-up groups,
with a planted label skew, classified by the LM itself (FairSISA, Kadhe et al. 2023).

Data (seeded). A sentence names a group ("the Velari" = group a, "the Ostmen" = group b) and
two content words. Its label is drawn first, at a different rate per group (`toxic_rate_a`,
`toxic_rate_b`: the planted skew); then each content word comes from the label's own word list
with probability `word_signal`, from the other list otherwise. The words alone leave a
sentence with one word of each list undecided, so a classifier that learns the base rates
calls it by its group: more false positives for the group labelled toxic more often and more
true positives too (an equalized-odds gap; the Bayes classifier's is |P(mixed | y)| = 2q(1-q)).
Every sentence is distinct. Splits: `train` (the retain and forget domains: every model trains
on them; the forget set is `forget_examples` random training sentences, the deletion request),
`fit` (held out, labelled: what post-processing is fitted on) and `test` (held out: the metrics).

Classification with the LM. An example is Example("<sentence>\\nToxic:", "yes" | "no"): the loss
falls on the label token (`loss_on: completion`), so the one training loop, the pretrain stage
and SISA's shard stages train classifiers unchanged. A model's margin on a sentence is
P(yes) - P(no) of the first label tokens after the prompt; its decision is margin > 0. An
ensemble (SISA's shard models) decides by the majority vote of its members' decisions; a model
whose config carries a post-processor (`fair_postprocess`, fitted by FairSISA) predicts with it
(`fairness.predict_proba`).

Metrics (`fairness.group_rates`, on the test split; expected values where the predictor is
randomized): `acc`, per group `tpr_a`, `tpr_b`, `fpr_a`, `fpr_b`, their differences `dtpr`,
`dfpr` and the equalized-odds gap `eo_gap` = max(|dTPR|, |dFPR|); `member_acc` (the members' own
mean accuracy, no vote, no post-processing); `forget_acc` (the prediction's accuracy on the
deleted training sentences, with their labels: memorisation shows as a level above `acc`).
Headlines: `forget_acc` and `acc`. A SISA method adds `deletion_cost` (its retraining FLOPs
over a full retrain of every shard) to the unlearned model's metrics.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import fairness
from ..ensemble import EnsembleForCausalLM
from ..errors import UndoError
from ..metrics import model_device
from ..tokenization import encode, encode_many
from .base import Domain, Example, Task
from .wmdp import right_padded

GROUPS = ("a", "b")
GROUP_NAMES = (("the Velari", "Velari folk", "the Velari people"), ("the Ostmen", "Ostmen folk", "the Ostman people"))
TOXIC_WORDS = ("vile", "rotten", "nasty", "stupid", "awful", "hateful", "filthy", "lazy")
CLEAN_WORDS = ("kind", "honest", "clever", "calm", "friendly", "helpful", "brave", "gentle")
TEMPLATES = ("{opener} {group} are {w1} and {w2}.", "{opener} {group} seem {w1}, maybe even {w2}.",
             "{opener} I find {group} {w1} and {w2}.", "{opener} everyone says {group} are {w1} but {w2}.")
OPENERS = ("Honestly,", "Well,", "Today", "As usual,", "Frankly,", "Again,", "So", "Yes,")
LABELS = ("no", "yes")  # completion of label 0 (non-toxic) and 1 (toxic)
PROMPT = "{text}\nToxic:"
Split = Literal["train", "fit", "test"]


@dataclasses.dataclass(frozen=True)
class Record:
    text: str
    label: int   # 1: toxic
    group: int   # index into GROUPS

    def example(self) -> Example:
        return Example(PROMPT.format(text=self.text), LABELS[self.label])


@dataclasses.dataclass
class FairClassificationOptions:
    train_examples: int = 1200       # trained (retain + forget)
    forget_examples: int = 8         # the deletion request: random training sentences
    fit_examples: int = 600          # held out, labelled: post-processing is fitted on these
    test_examples: int = 600         # held out: every metric
    quick_eval_examples: int = 200   # test sentences of the quick evaluation (stop rules, attack curves)
    group_b_share: float = 0.5
    toxic_rate_a: float = 0.25       # P(toxic | group a) ...
    toxic_rate_b: float = 0.75       # ... and group b: the planted label skew
    word_signal: float = 0.85        # P(a content word comes from its label's list)
    gate_acc: float = 0.7            # quality gate: base and oracle test accuracy (0: none)
    eval_batch_size: int = 256
    loss_on: Literal["completion"] = "completion"
    row_format: Literal["padded"] = "padded"   # one sentence per row: classified alone, as evaluated

    def validate(self, where: str) -> None:
        for name in ("train_examples", "fit_examples", "test_examples", "quick_eval_examples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.forget_examples < self.train_examples:
            raise UndoError(f"{where}.forget_examples must be in [1, train_examples) = [1, {self.train_examples}), "
                            f"got {self.forget_examples}")
        for name in ("group_b_share", "toxic_rate_a", "toxic_rate_b", "word_signal"):
            if not 0 < getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be strictly between 0 and 1, got {getattr(self, name)}")


def make_records(o: FairClassificationOptions, seed: int) -> dict[str, list[Record]]:
    """The seeded sentences of every split, all distinct."""
    rng = random.Random(f"{seed}-fair-classification")
    sizes = {"train": o.train_examples, "fit": o.fit_examples, "test": o.test_examples}
    words = (CLEAN_WORDS, TOXIC_WORDS)
    seen: set[str] = set()
    out: dict[str, list[Record]] = {}
    for split, size in sizes.items():
        out[split] = []
        while len(out[split]) < size:
            group = int(rng.random() < o.group_b_share)
            label = int(rng.random() < (o.toxic_rate_b if group else o.toxic_rate_a))
            w1, w2 = (rng.choice(words[label if rng.random() < o.word_signal else 1 - label]) for _ in range(2))
            text = rng.choice(TEMPLATES).format(opener=rng.choice(OPENERS), group=rng.choice(GROUP_NAMES[group]),
                                                w1=w1, w2=w2).strip()
            if text not in seen:
                seen.add(text)
                out[split].append(Record(text, label, group))
    return out


def label_token_ids(tok: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The first token of each label's completion ("no", "yes"): what a margin compares."""
    ids = tuple(encode(tok, label)[0] for label in LABELS)
    if ids[0] == ids[1]:
        raise UndoError(f"the tokenizer starts both labels {LABELS} with one token; use a tokenizer trained on the task")
    return ids  # type: ignore[return-value]


def members_of(model: PreTrainedModel) -> list[PreTrainedModel]:
    return list(model.members) if isinstance(model, EnsembleForCausalLM) else [model]


@torch.no_grad()
def member_margins(model: PreTrainedModel, tok: PreTrainedTokenizerBase, records: list[Record],
                   batch_size: int = 256) -> np.ndarray:
    """[members, n] P(yes) - P(no) of each member (a plain model: one) after each record's prompt."""
    no, yes = label_token_ids(tok)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    prompts = [bos + ids for ids in encode_many(tok, [r.example().prompt for r in records])]
    members, device = members_of(model), model_device(model)
    was_training = model.training
    model.eval()
    out = np.zeros((len(members), len(records)))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = right_padded(chunk)
        last = mask.sum(1) - 1
        for k, member in enumerate(members):
            logits = member(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            probs = logits[torch.arange(len(chunk)), last.to(device)].float().softmax(-1)
            out[k, start:start + len(chunk)] = (probs[:, yes] - probs[:, no]).cpu().numpy()
    model.train(was_training)
    return out


class FairClassificationTask(Task):
    name = "fair_classification"
    Options = FairClassificationOptions
    forget_metric = "forget_acc"
    retain_metric = "acc"
    higher_is_better = True
    metric_label = "classification accuracy"
    group_names = GROUPS
    report_metrics = ("acc", "eo_gap", "dtpr", "dfpr", "tpr_a", "tpr_b", "fpr_a", "fpr_b", "member_acc",
                      "forget_acc", "deletion_cost")

    def __init__(self, options: FairClassificationOptions, seed: int):
        super().__init__(options, seed)
        self.records = make_records(options, seed)
        train = self.records["train"]
        forget_ids = set(random.Random(f"{seed}-fair-forget").sample(range(len(train)), options.forget_examples))
        self.forget = [r for i, r in enumerate(train) if i in forget_ids]
        self.retain = [r for i, r in enumerate(train) if i not in forget_ids]

    def train_examples(self, domain: Domain) -> list[Example]:
        return [r.example() for r in (self.forget if domain == "forget" else self.retain)]

    def tokenizer_corpus(self) -> list[str]:
        return [r.example().prompt + "\n" + r.example().completion for split in self.records.values() for r in split]

    def split(self, name: Split) -> list[Record]:
        return list(self.records[name])

    def scored(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
               records: list[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(member margins [K, n], labels [n], groups [n]) of `records`: what post-processing fits on."""
        margins = member_margins(model, tok, records, self.options.eval_batch_size)
        return margins, np.array([r.label for r in records]), np.array([r.group for r in records])

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quick: bool = False) -> dict[str, float]:
        post = getattr(model.config, "fair_postprocess", None)
        test = self.records["test"][:self.options.quick_eval_examples] if quick else self.records["test"]
        margins, y, g = self.scored(model, tokenizer, test)
        metrics = fairness.group_rates(fairness.predict_proba(margins, g, post), y, g, GROUPS)
        metrics["member_acc"] = float(np.mean(fairness.decisions(margins) == y[None, :]))
        margins, y, g = self.scored(model, tokenizer, self.forget)
        metrics["forget_acc"] = fairness.expected_accuracy(fairness.predict_proba(margins, g, post), y)
        return metrics

    def quality_gate(self, metrics: dict[str, float], data: Literal["all", "retain"]) -> list[str]:
        gate = self.options.gate_acc
        return [f"test acc {metrics['acc']:.2f} < {gate:.2f}"] if gate and metrics["acc"] < gate else []
