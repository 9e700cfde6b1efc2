"""Rewards for generated text, and the sampler that generates it.

A reward maps continuations (text) to scores in [0, 1], higher = better, i.e. less of the
behaviour being removed (toxicity, negative sentiment, repetition): `reward(texts) -> np.ndarray`.
What ships:
- `TextClassifierReward`: a character n-gram logistic regression (scikit-learn) that undo
  trains on a seeded synthetic corpus (texts with and without the behaviour); reward =
  1 - P(behaviour). The toxicity task's default (an invented insult lexicon vs neutral text).
- `RepetitionReward`: the share of distinct word bigrams of a continuation (degenerate,
  looping text scores low); nothing to train.
- `HFClassifierReward`: a local Hugging Face sequence classifier (e.g. a toxicity model
  downloaded beforehand); reward = 1 - P(label).
- `callable_reward("module:function")`: any function texts -> scores.
`sample_continuations` samples (seeded, nucleus) continuations of token-id prompts; the
toxicity task evaluates with it and Quark explores with it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from transformers import PreTrainedModel

from .errors import UndoError
from .metrics import model_device
from .privacy_metrics import left_padded

Reward = Callable[[Sequence[str]], np.ndarray]
WORD = re.compile(r"[\w'-]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class TextClassifierReward:
    """1 - P(behaviour) from a TF-IDF character n-gram logistic regression. Character n-grams
    (within words) let a garbled or half-generated insult still count."""

    def __init__(self, bad: Sequence[str], good: Sequence[str], seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if not bad or not good:
            raise UndoError("a reward classifier needs texts with and without the behaviour")
        self.pipeline = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True),
                                      LogisticRegression(C=10.0, max_iter=1000, random_state=seed))
        self.pipeline.fit(list(bad) + list(good), [1] * len(bad) + [0] * len(good))

    def bad_probability(self, texts: Sequence[str]) -> np.ndarray:
        return self.pipeline.predict_proba(list(texts))[:, 1] if len(texts) else np.zeros(0)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return 1.0 - self.bad_probability(texts)


def distinct_share(tokens: Sequence, n: int) -> float:
    """Distinct n-grams / n-grams of one token sequence (1.0 when it has none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


class RepetitionReward:
    """The share of distinct word bigrams of each continuation: 1 for text that never repeats a
    bigram, near 0 for a loop ("the map the map the map")."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([distinct_share(words(t), 2) for t in texts], dtype=float)


class HFClassifierReward:
    """1 - P(`label`) of a local Hugging Face sequence classifier (a directory; no network)."""

    def __init__(self, path: str, label: Union[int, str] = 1, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise UndoError(f"reward model {path} is not a directory; give a local Hugging Face sequence classifier")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise UndoError(f"{path}: cannot load a sequence classifier ({type(e).__name__}); "
                            f"give a directory saved with save_pretrained") from None
        labels = self.model.config.label2id or {}
        self.label = labels.get(label, label) if isinstance(label, str) else label
        if not isinstance(self.label, int) or not 0 <= self.label < self.model.config.num_labels:
            raise UndoError(f"reward_label {label!r} is not a label of {path} (labels: {sorted(labels) or 'numbered'})")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tok(list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                           truncation=True)
            out.append(self.model(**enc).logits.float().softmax(-1)[:, self.label].numpy())
        return 1.0 - np.concatenate(out) if out else np.zeros(0)


def callable_reward(target: str) -> Reward:
    """The function `module:function` (texts -> scores in [0, 1], higher = better)."""
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UndoError(f"reward_fn '{target}': cannot import it; give 'module:function' importable "
                        f"from this Python environment") from None
    return lambda texts: checked_scores(fn(list(texts)), len(texts), target)


def checked_scores(scores, n: int, where: str) -> np.ndarray:
    try:
        values = np.asarray(scores, dtype=float)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (n,) or not np.all(np.isfinite(values)):
        shape = "non-numbers" if values is None else f"shape {values.shape}"
        raise UndoError(f"reward {where} must return one finite score per text ({n}), got {shape}")
    return values


@torch.no_grad()
def sample_continuations(model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         seed: int, pad_id: int, eos_id: Optional[int], top_p: float = 1.0,
                         temperature: float = 1.0, batch_size: int = 128,
                         suppress: Sequence[int] = ()) -> list[list[int]]:
    """One sampled continuation (token ids, cut before EOS, which is kept as the last id when the
    model ended there) per prompt of token ids. Seeded: the sampler forks the RNG, so training's
    random state is left as it was. `suppress`: ids never sampled (e.g. Quark's reward tokens)."""
    device, was_training = model_device(model), model.training
    model.eval()
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(prompts[start:start + batch_size], pad_id)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 top_p=top_p, top_k=0, temperature=temperature, max_new_tokens=max_new_tokens,
                                 min_new_tokens=0, pad_token_id=pad_id, eos_token_id=eos_id,
                                 suppress_tokens=list(suppress) or None)
            for row in gen[:, ids.shape[1]:].tolist():
                if eos_id is not None and eos_id in row:
                    row = row[:row.index(eos_id) + 1]
                out.append(row)
    model.train(was_training)
    return out
