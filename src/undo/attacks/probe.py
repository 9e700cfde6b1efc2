"""Linear probes on hidden states: is the forgotten answer still linearly readable inside?

At every depth k of the residual stream (`arch.residual_streams`: k = 0 is the embeddings,
k the stream after decoder layer k-1), a multinomial logistic regression (scikit-learn,
standardised features) reads the stream at each text's last token and predicts its label.
It is fitted on a train split and scored on a disjoint test split. Labels:

- `answer`: the forget answers. Train: the task's forget training examples (prompt ->
  answer); test: the forget items `evaluate` scores (held out from training). The stream is
  read where the model has to say the answer's first non-blank token: the prompt's last
  token, or the answer's leading blank token ("Ġ" of "Ġ" + "56"; `answer_context`).
- `domain`: forget vs retain, for tasks without answer classes (text): both domains'
  training text, a seeded fifth of each held out for test, read at the last of its first
  `max_tokens` tokens.
- `auto` (default): `answer` where the task has forget items and its forget examples are
  prompt -> answer pairs, else `domain`.

The depth is chosen on a validation fifth of the train split (the attacker picks a layer
without looking at the test set); the headline `probe_acc` is the test accuracy there. The
run's one curve entry (step 1) also holds every depth's test accuracy (`probe_acc/layer<k>`,
what the report plots per layer), the chosen depth (`probe_layer`), the test set's
majority-class share (`probe_chance`) and, with `control`, the same probes fitted to
shuffled train labels (`probe_control_acc`: Hewitt & Liang's control, what a probe gets
without any signal in the stream). A model that knows the answers gives ~1; the oracle's
probe is the floor: what the inputs alone say about the answers.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import arch
from ..config import to_dict
from ..errors import UndoError
from ..metrics import model_device
from ..models import load_model, non_embedding_params
from ..tasks import Task, build_task
from ..tokenization import encode_many
from .base import Attack


@dataclasses.dataclass
class ProbeConfig:
    labels: Literal["auto", "answer", "domain"] = "auto"
    train_examples: int = 2000         # probe training texts (the last fifth validates the depth)
    test_examples: int = 1000          # at most this many test texts (answer: the task's forget items)
    max_tokens: int = 128              # texts are cut to this many tokens
    C: float = 1.0                     # inverse L2 strength of the logistic regression (scikit-learn's C)
    max_iter: int = 300                # lbfgs iterations; shuffled-label controls never converge, so this bounds the cost
    control: bool = True               # also fit probes to shuffled labels (the control accuracy)
    batch_size: int = 64               # texts per forward pass

    def validate(self, where: str) -> None:
        for name in ("train_examples", "test_examples", "max_tokens", "max_iter", "batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.train_examples < 10:
            raise UndoError(f"{where}.train_examples must be at least 10 (a fifth validates the layer), "
                            f"got {self.train_examples}")
        if self.C <= 0:
            raise UndoError(f"{where}.C must be positive, got {self.C}")


# ------------------------------------------------------------------ reading the stream


def answer_context(tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    """Token ids up to where the model has to say an answer's first non-blank token: the
    prompt, then the answer's leading blank tokens (a byte-level BPE may encode " 56" as
    "Ġ" + "56"; the answer is then decided at "Ġ", not at the prompt's last token). Prompt and
    answer are encoded apart, as in training and evaluation."""
    out = []
    for prompt, answer in zip(encode_many(tok, list(prompts)), encode_many(tok, list(answers))):
        lead = 0
        while lead < len(answer) and not tok.decode(answer[lead]).strip():
            lead += 1
        out.append(prompt + answer[:lead])
    return out


@torch.no_grad()
def read_streams(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str] | Sequence[list[int]],
                 max_tokens: int, pool: Literal["last", "mean"], batch_size: int = 64) -> tuple[torch.Tensor, int]:
    """The residual stream at every depth for each text ([depths, texts, hidden], float32 on
    the CPU) and the number of tokens read. A text (a string, or its token ids) is read as
    [BOS] + its tokens, cut to `max_tokens`; `last` reads its last token, `mean` averages its
    tokens (BOS excluded: its stream is the same for every text)."""
    if not texts:
        raise UndoError("read_streams: no texts to read")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids_list = encode_many(tok, list(texts)) if isinstance(texts[0], str) else texts
    rows = [bos + list(ids[:max_tokens]) for ids in ids_list]
    if any(len(r) == len(bos) for r in rows):
        raise UndoError("read_streams: a text has no tokens; the task gave an empty probe text")
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    tokens = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        tokens += int(mask.sum())
        streams = torch.stack(arch.residual_streams(model, ids.to(device), mask.to(device))).float()  # [D, B, T, H]
        if pool == "last":
            last = (mask.sum(1) - 1).to(device)
            out.append(streams[:, torch.arange(len(chunk), device=device), last].cpu())
        else:
            weights = mask.clone()
            weights[:, : len(bos)] = 0
            weights = (weights / weights.sum(1, keepdim=True)).to(device, streams.dtype)
            out.append(torch.einsum("dbth,bt->dbh", streams, weights).cpu())
    model.train(was_training)
    return torch.cat(out, dim=1), tokens


# ------------------------------------------------------------------ the probe data


def _has_items(task: Task) -> bool:
    return type(task).forget_items is not Task.forget_items


def probe_data(task: Task, cfg: ProbeConfig, seed: int) -> tuple[str, list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(label kind, train, test): (text, answer, label) triples sampled with the seed; the
    stream is read where the answer's first non-blank token is due (`answer_context`;
    domain labels: answer "", the text's last token)."""
    rng = random.Random(seed)
    forget = task.train_examples("forget")
    kind = cfg.labels
    if kind == "auto":
        kind = "answer" if _has_items(task) and forget and all(ex.prompt for ex in forget) else "domain"
    if kind == "answer":
        if not _has_items(task):
            raise UndoError(f"probe labels 'answer': task '{task.name}' has no forget items with answers; "
                            f"use labels: domain")
        train = [(ex.prompt, ex.completion, ex.completion.strip()) for ex in forget if ex.prompt]
        test = [(ex.prompt, ex.completion, ex.completion.strip()) for group in task.forget_items().values() for ex in group]
        held = {text for text, _, _ in test}
        train = [item for item in train if item[0] not in held]  # a test prompt is never a training one
    else:
        train, test = [], []
        for domain in ("forget", "retain"):
            for i, ex in enumerate(task.train_examples(domain)):
                (test if i % 5 == 0 else train).append((ex.prompt + ex.completion, "", domain))
    rng.shuffle(train)
    rng.shuffle(test)
    train, test = train[: cfg.train_examples], test[: cfg.test_examples]
    if len(train) < 10 or not test:
        raise UndoError(f"probe: too few examples ({len(train)} to train, {len(test)} to test); "
                        f"the task needs more forget data")
    return kind, train, test


# ------------------------------------------------------------------ the probes


def fit_probe(x: np.ndarray, y: Sequence[str], C: float, max_iter: int):
    """A standardised multinomial logistic regression fitted to (x, y)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # at max_iter the fit is still a probe; scores say how good
        probe.fit(x, list(y))
    return probe


def probe_layers(train_x: torch.Tensor, train_y: Sequence[str], test_x: torch.Tensor, test_y: Sequence[str],
                 C: float = 1.0, max_iter: int = 300) -> dict[str, Any]:
    """Probes at every depth ([depths, n, hidden] features), each fitted on the first four
    fifths of the train split; the last fifth validates the depth. Returns per-depth
    validation and test accuracy, the chosen depth and its test accuracy."""
    n_val = max(1, len(train_y) // 5)
    fit_y, val_y, test_y = list(train_y[:-n_val]), np.array(list(train_y[-n_val:])), np.array(list(test_y))
    if len(set(fit_y)) < 2:
        raise UndoError("probe: the train split has one label only; a probe needs at least two classes")
    val_acc, test_acc = [], []
    for depth in range(train_x.shape[0]):
        xs = train_x[depth].numpy()
        probe = fit_probe(xs[:-n_val], fit_y, C, max_iter)
        val_acc.append(float(np.mean(probe.predict(xs[-n_val:]) == val_y)))
        test_acc.append(float(np.mean(probe.predict(test_x[depth].numpy()) == test_y)))
    best = int(np.argmax(val_acc))  # first maximum: the shallowest of equally good depths
    return {"val_acc": val_acc, "test_acc": test_acc, "layer": best, "acc": test_acc[best]}


def majority_share(labels: Sequence[str]) -> float:
    values, counts = np.unique(np.array(list(labels)), return_counts=True)
    return float(counts.max() / len(labels))


class Probe(Attack):
    name = "probe"
    description = "linear probes (logistic regression) on every layer's hidden states predicting the forget answers"
    Options = ProbeConfig
    matrix_metric = "probe_acc"  # the report's headline for it (not the task's forget metric); higher = more recovered

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        cfg = self.options
        start = time.time()
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        kind, train, test = probe_data(task, cfg, seed)
        streams = {}
        for split, items in (("train", train), ("test", test)):
            texts = answer_context(tok, [t for t, _, _ in items], [a for _, a, _ in items])
            if kind == "answer":  # a long prompt keeps its end: the position read
                texts = [ids[-cfg.max_tokens:] for ids in texts]
            streams[split] = read_streams(model, tok, texts, cfg.max_tokens, "last", cfg.batch_size)
        (train_x, n_train), (test_x, n_test) = streams["train"], streams["test"]
        train_y, test_y = [y for _, _, y in train], [y for _, _, y in test]
        result = probe_layers(train_x, train_y, test_x, test_y, cfg.C, cfg.max_iter)
        entry: dict[str, Any] = {"step": 1, "probe_acc": result["acc"], "probe_layer": result["layer"],
                                 "probe_chance": majority_share(test_y)}
        entry.update({f"probe_acc/layer{k}": acc for k, acc in enumerate(result["test_acc"])})
        if cfg.control:
            shuffled = list(train_y)
            random.Random(seed + 1).shuffle(shuffled)
            control = probe_layers(train_x, shuffled, test_x, test_y, cfg.C, cfg.max_iter)
            entry["probe_control_acc"] = control["acc"]
        flops = 2.0 * non_embedding_params(model) * (n_train + n_test)
        return {"curve": [entry], "flops": flops, "wall_seconds": time.time() - start, "labels": kind,
                "train_examples": len(train), "test_examples": len(test), "config": to_dict(cfg)}
