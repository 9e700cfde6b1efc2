"""Question-answering metrics of fictitious-entity unlearning, with TOFU's definitions.

TOFU (Maini et al., 2024) scores a model on four sets of questions (forget, retain, real
authors, world facts). Per question, from the model's greedy answer and its likelihoods
(L(a | q) = mean negative log-likelihood per token of answer a after question q):

- exact match: the greedy answer, stripped, equals the ground truth;
- ROUGE-L recall of the greedy answer against the ground truth (`rouge-score`, stemmed, as
  TOFU's code);
- answer probability: P(a | q)^(1/|a|) = exp(-L(a | q)); on real authors and world facts
  normalised over the answer and its perturbed (wrong) answers: p_true / (p_true + sum p_pert);
- truth ratio R = P(perturbed)^(1/|.|) / P(paraphrased)^(1/|.|) = exp(L(para) - mean_k L(pert_k)).
  TOFU's code averages the perturbed answers' losses (a geometric mean of their normalised
  probabilities; the paper writes an arithmetic mean); we follow the code, whose numbers are
  the published ones. R < 1: the model prefers the true answer;
- truth score: TOFU's per-set summary of R: forget set mean min(R, 1/R), other sets
  mean max(0, 1 - R);
- multiple choice: the choice with the highest likelihood per token after the question
  (cloze form: a small model never trained on lettered options can still be read this way).

Per model: forget quality = the p-value of a two-sample Kolmogorov-Smirnov test between the
forget set's truth ratios under the model and under the oracle (scipy's ks_2samp; high: the
model is indistinguishable from one never trained on the forget set); model utility = the
harmonic mean of (answer probability, ROUGE-L recall, truth score) on retain, real authors
and world facts (nine numbers, 0 when any is 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import pad_batch
from .errors import UndoError
from .metrics import greedy_complete, model_device, token_logprobs
from .tasks.base import Example
from .tokenization import encode


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question with what TOFU scores it against."""

    question: str
    answer: str
    paraphrased_question: str           # "" where the source has none
    paraphrased_answer: str             # the truth ratio's true answer (the answer itself where none is given)
    perturbed_answers: tuple[str, ...]  # wrong answers in the paraphrased answer's form
    choices: tuple[str, ...]            # multiple-choice options, one of them right
    correct: int                        # index of the right choice
    entity: str = ""                    # whom or what the question is about


def qa_prompt(question: str) -> str:
    """The one question format of the facts task, in training and evaluation."""
    return f"Question: {question}\nAnswer:"


def qa_completion(answer: str) -> str:
    return " " + answer.strip()


# ---------------------------------------------------------------- per-question numbers

def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ModuleNotFoundError:
        raise UndoError("the facts task's ROUGE-L needs the rouge-score package; pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, answer: str) -> float:
    """ROUGE-L recall of `prediction` against the ground truth `answer` (TOFU's rougeL_recall)."""
    return _rouge_scorer().score(answer, prediction)["rougeL"].recall


def answer_probability(nll: float) -> float:
    """P(a | q)^(1/|a|) from the mean negative log-likelihood per token."""
    return math.exp(-nll)


def normalised_probability(true_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """p_true / (p_true + sum p_pert), each p = exp(-mean NLL per token) (TOFU, real authors / world facts)."""
    p_true = answer_probability(true_nll)
    return p_true / (p_true + sum(answer_probability(x) for x in perturbed_nlls))


def truth_ratio(paraphrased_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """R = exp(L(para) - mean_k L(pert_k)): the perturbed answers' normalised probability over the paraphrased one's."""
    if not perturbed_nlls:
        raise UndoError("a truth ratio needs at least one perturbed answer; give each question perturbed answers")
    return math.exp(paraphrased_nll - sum(perturbed_nlls) / len(perturbed_nlls))


def truth_score(ratios: Sequence[float], forget: bool) -> float:
    """TOFU's summary of a set's truth ratios: forget mean min(R, 1/R), else mean max(0, 1 - R)."""
    if not ratios:
        raise UndoError("no truth ratios to summarise; the question set is empty")
    values = [min(r, 1 / r) if forget else max(0.0, 1 - r) for r in ratios]
    return sum(values) / len(values)


def forget_quality(model_ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between the forget set's truth ratios of the model and the oracle."""
    from scipy.stats import ks_2samp

    if not model_ratios or not oracle_ratios:
        raise UndoError("forget quality needs the forget set's truth ratios of both the model and the oracle")
    return float(ks_2samp(list(model_ratios), list(oracle_ratios)).pvalue)


def model_utility(scores: Sequence[float]) -> float:
    """Harmonic mean of the scores (TOFU: nine of them); 0 when any score is 0."""
    if not scores:
        raise UndoError("model utility needs at least one score")
    if any(s <= 0 for s in scores):
        return 0.0
    return len(scores) / sum(1 / s for s in scores)


def mcq_accuracy(choice_nlls: Sequence[Sequence[float]], correct: Sequence[int]) -> float:
    """Share of questions whose lowest-loss choice (first on ties) is the right one."""
    if not choice_nlls:
        raise UndoError("no multiple-choice questions to score")
    picks = [min(range(len(nlls)), key=lambda i: nlls[i]) for nlls in choice_nlls]
    return sum(p == c for p, c in zip(picks, correct)) / len(picks)


# ---------------------------------------------------------------- model passes

@torch.no_grad()
def completion_nlls(model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
                    batch_size: int = 64) -> list[float]:
    """Mean negative log-likelihood per token of each (prompt, completion)'s completion, EOS
    included as in training; each distinct pair is scored once, rows sorted by length."""
    distinct = sorted(set(pairs), key=lambda p: len(p[0]) + len(p[1]))
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll: dict[tuple[str, str], float] = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start:start + batch_size]
        batch = pad_batch(tok, [Example(p, c) for p, c in chunk], "completion")
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, batch["labels"])
        values = (-logp.sum(1) / mask.sum(1).clamp(min=1)).tolist()
        nll.update(zip(chunk, values))
    model.train(was_training)
    return [nll[p] for p in pairs]


def answer_tokens(tok: PreTrainedTokenizerBase, answers: Sequence[str], cap: int) -> int:
    """New tokens a greedy answer needs: the longest answer's tokens and its EOS, at most `cap`."""
    return min(cap, 1 + max(len(encode(tok, qa_completion(a))) for a in answers))


def score_qa_set(model: PreTrainedModel, tok: PreTrainedTokenizerBase, items: Sequence[QAItem], forget: bool,
                 normalise_probability: bool, max_new_tokens: int = 64,
                 batch_size: int = 64) -> tuple[dict[str, float], list[float]]:
    """TOFU's numbers of one question set, and its per-question truth ratios (for forget quality).
    `normalise_probability`: answer probability over the answer and its perturbed answers
    (real authors, world facts) instead of the plain one (forget, retain)."""
    if not items:
        raise UndoError("an evaluation question set is empty; give the facts task more entities or items")
    new_tokens = answer_tokens(tok, [it.answer for it in items], max_new_tokens)
    answers = greedy_complete(model, tok, [qa_prompt(it.question) for it in items], new_tokens)
    with_para = [it for it in items if it.paraphrased_question]
    para_answers = greedy_complete(model, tok, [qa_prompt(it.paraphrased_question) for it in with_para], new_tokens)
    pairs = [(qa_prompt(it.question), qa_completion(a)) for it in items
             for a in (it.answer, it.paraphrased_answer, *it.perturbed_answers, *it.choices)]
    nlls = iter(completion_nlls(model, tok, pairs, batch_size))
    probs, ratios, choice_nlls = [], [], []
    for it in items:
        true_nll, para_nll = next(nlls), next(nlls)
        pert_nlls = [next(nlls) for _ in it.perturbed_answers]
        choice_nlls.append([next(nlls) for _ in it.choices])
        probs.append(normalised_probability(true_nll, pert_nlls) if normalise_probability
                     else answer_probability(true_nll))
        ratios.append(truth_ratio(para_nll, pert_nlls))
    n = len(items)
    metrics = {
        **answer_scores(answers, [it.answer for it in items]),
        "prob": sum(probs) / n,
        "truth_ratio": sum(ratios) / n,
        "truth_score": truth_score(ratios, forget),
        "mcq_acc": mcq_accuracy(choice_nlls, [it.correct for it in items]),
    }
    if with_para:
        metrics["para_acc"] = answer_scores(para_answers, [it.answer for it in with_para])["acc"]
    return metrics, ratios


# ---------------------------------------------------------------- familiarity (Who's Harry Potter)

@dataclasses.dataclass(frozen=True)
class FamiliarityProbe:
    """WHP's completion probe: the start of a held-out sentence about an entity ("Elen Ashwood was
    born in the city of") that its true value completes; `wrong_values` are the alternatives the
    token-probability score compares it with."""

    prefix: str
    value: str
    wrong_values: tuple[str, ...]


def familiarity_scores(completions: Sequence[str], probes: Sequence[FamiliarityProbe],
                       value_nlls: Sequence[Sequence[float]]) -> dict[str, float]:
    """Eldan & Russinovich's two evaluations, automated: "familiarity", the share of greedy
    completions that name the true value (their completion probes, judged by string match instead
    of GPT-4), and "familiarity_prob", the true value's probability normalised over it and the
    wrong values (their token-probability probes; chance = 1 / (1 + wrong values)).
    `value_nlls[i]` = [NLL of the true value, NLL of each wrong value] after probe i's prefix."""
    if not probes or not len(completions) == len(value_nlls) == len(probes):
        raise UndoError(f"familiarity needs one completion and one NLL list per probe, got {len(completions)} "
                        f"and {len(value_nlls)} for {len(probes)} probes")
    named = [p.value.lower() in " ".join(c.lower().split()) for c, p in zip(completions, probes)]
    probs = [normalised_probability(nlls[0], nlls[1:]) for nlls in value_nlls]
    return {"familiarity": sum(named) / len(probes), "familiarity_prob": sum(probs) / len(probes)}


def probe_familiarity(model: PreTrainedModel, tok: PreTrainedTokenizerBase, probes: Sequence[FamiliarityProbe],
                      max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, float]:
    """`familiarity_scores` of a model: greedy completions of the prefixes, long enough for the
    longest value (plus two tokens of slack for what precedes it), and each value's NLL."""
    new_tokens = answer_tokens(tok, [p.value for p in probes], max_new_tokens - 2) + 2
    completions = greedy_complete(model, tok, [p.prefix for p in probes], new_tokens)
    pairs = [(p.prefix, qa_completion(v)) for p in probes for v in (p.value, *p.wrong_values)]
    nlls = iter(completion_nlls(model, tok, pairs, batch_size))
    value_nlls = [[next(nlls) for _ in range(1 + len(p.wrong_values))] for p in probes]
    return familiarity_scores(completions, probes, value_nlls)


# ---------------------------------------------------------------- knowledge updates (editing)

def answer_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Exact match ("acc") and ROUGE-L recall ("rougeL") of answers against the expected ones, each
    the mean over the questions. Knowledge editing's numbers (Ni et al., 2023, after ZsRE / CounterFact):
    reliability = this on the updated questions against the new values, generality = on their
    paraphrases, locality = on facts that did not change, against their (unchanged) values."""
    if not answers or len(predictions) != len(answers):
        raise UndoError(f"answer scores need one prediction per expected answer, got {len(predictions)} "
                        f"for {len(answers)}; give a non-empty, matching pair of lists")
    n = len(answers)
    return {"acc": sum(exact_match(p, a) for p, a in zip(predictions, answers)) / n,
            "rougeL": sum(rouge_l_recall(p, a) for p, a in zip(predictions, answers)) / n}


def greedy_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase, questions: Sequence[str],
                   answers: Sequence[str], max_new_tokens: int = 64) -> list[str]:
    """The model's greedy answers to `questions` (in the task's QA format), long enough for the
    longest of `answers` and its EOS (at most `max_new_tokens`)."""
    return greedy_complete(model, tok, [qa_prompt(q) for q in questions], answer_tokens(tok, answers, max_new_tokens))
