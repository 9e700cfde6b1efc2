"""Equalized odds for binary classifiers and ensembles: the rates, the gap, and Hardt et al.'s
post-processing (Hardt, Price & Srebro, "Equality of Opportunity in Supervised Learning", 2016).

A classifier here is K members, each giving a margin per example (P(yes) - P(no) of its label
tokens; decision: margin > 0). One member predicts its decision; several predict by majority
vote, a tie (even K) going to the mean margin's sign (the ensemble model's mean distribution).

Post-processing (FairSISA, Kadhe et al. 2023) derives a randomized predictor Y~ from a discrete
value U of the classifier and the sensitive group A: x[a, u] = P(Y~ = 1 | U = u, A = a),
chosen by the linear program of Hardt et al. on held-out labelled data: minimise the expected
error subject to equal true- and false-positive rates in every group. Variants (what U is):
- "vote":    U = the majority vote (2 values per group);
- "members": every member post-processed alone on its own decision, then the vote of the
             randomized members (the share of a majority of independent coin flips, exactly);
- "vector":  U = the whole vector of member decisions (2^K values per group).
Predictions are the probabilities P(Y~ = 1), and every metric is its expectation over the
coins: exact and seedless. A post-processor is a plain dict (`fit_postprocessor`), saved in
the model's config and applied by `predict_proba`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
from scipy.optimize import linprog

from .errors import UndoError

Variant = Literal["vote", "members", "vector"]
VARIANTS: tuple[str, ...] = ("vote", "members", "vector")
MAX_VECTOR_MEMBERS = 12  # U = the vote vector has 2^K values per group
# A nudge toward the classifier's own decision, far below any error difference the data can
# make (1 / examples): it settles values the fit data never shows, and exact ties, that way.
TIE_BREAK = 1e-7


def decisions(margins: np.ndarray) -> np.ndarray:
    """[K, n] margins -> [K, n] member decisions (0/1)."""
    return (np.asarray(margins) > 0).astype(int)


def majority_vote(margins: np.ndarray) -> np.ndarray:
    """[K, n] margins -> [n] majority vote of the members' decisions; ties: the mean margin's sign."""
    margins = np.asarray(margins, dtype=float)
    votes = 2 * decisions(margins).sum(0) - margins.shape[0]  # yes minus no
    return np.where(votes != 0, votes > 0, margins.mean(0) > 0).astype(int)


def vote_vector(margins: np.ndarray) -> np.ndarray:
    """[K, n] margins -> [n] index of each example's decision vector (member k is bit k)."""
    d = decisions(margins)
    return (d * (1 << np.arange(d.shape[0]))[:, None]).sum(0)


def majority_probability(probs: np.ndarray) -> np.ndarray:
    """[K, n] independent P(member k says yes) -> [n] P(more say yes than no), a tie counting
    half (a fair coin): the Poisson-binomial distribution of the yes count, by dynamic programming."""
    probs = np.asarray(probs, dtype=float)
    k = probs.shape[0]
    count = np.zeros((k + 1, probs.shape[1]))
    count[0] = 1.0
    for p in probs:  # count[j] = P(j yes so far)
        count[1:] = count[1:] * (1 - p) + count[:-1] * p
        count[0] = count[0] * (1 - p)
    wins = count[k // 2 + 1:].sum(0)
    return wins + (0.5 * count[k // 2] if k % 2 == 0 else 0.0)


def fit_equalized_odds(u: np.ndarray, y: np.ndarray, group: np.ndarray, values: int, groups: int,
                       default: Optional[np.ndarray] = None) -> np.ndarray:
    """Hardt et al.'s derived predictor: x[a, v] = P(Y~ = 1 | U = v, A = a) minimising the expected
    error on (u, y, group) subject to every group's TPR and FPR equal to group 0's; scipy's
    linprog (HiGHS). `default[v]`: the classifier's own decision for v (ties and unseen v lean to it)."""
    u, y, group = (np.asarray(a, dtype=int) for a in (u, y, group))
    n = len(y)
    counts = np.zeros((groups, values, 2))  # [a, v, label]
    np.add.at(counts, (group, u, y), 1.0)
    per_label = counts.sum(1)  # [a, label]
    for a in range(groups):
        for label, what in ((1, "positive"), (0, "negative")):
            if per_label[a, label] == 0:
                raise UndoError(f"equalized odds: the fit data has no {what} example in group {a}; "
                                f"give more held-out examples (or a less skewed label rate)")
    default = np.zeros(values) if default is None else np.asarray(default, dtype=float)
    cost = (counts[..., 0] - counts[..., 1]) / n - TIE_BREAK * (2 * default - 1)[None, :]
    rate = counts / per_label[:, None, :]  # P(U = v | A = a, Y = label)
    rows = []
    for a in range(1, groups):
        for label in (1, 0):  # TPR, then FPR
            row = np.zeros((groups, values))
            row[0], row[a] = rate[0, :, label], -rate[a, :, label]
            rows.append(row.ravel())
    result = linprog(cost.ravel(), A_eq=np.array(rows), b_eq=np.zeros(len(rows)), bounds=(0.0, 1.0), method="highs")
    if result.status != 0:  # cannot happen for a well-formed problem (a constant predictor is feasible)
        raise UndoError(f"equalized odds: the linear program failed ({result.message})")
    return np.clip(result.x.reshape(groups, values), 0.0, 1.0)


def fit_postprocessor(variant: Variant, margins: np.ndarray, y: np.ndarray, group: np.ndarray,
                      groups: int) -> dict[str, Any]:
    """The post-processor of one variant fitted on held-out data: a JSON-able dict for `predict_proba`."""
    margins = np.asarray(margins, dtype=float)
    k = margins.shape[0]
    if variant == "vote":
        table = fit_equalized_odds(majority_vote(margins), y, group, 2, groups, default=np.array([0, 1]))
    elif variant == "vector":
        if k > MAX_VECTOR_MEMBERS:
            raise UndoError(f"post-processing the vote vector of {k} members means 2^{k} values per group; "
                            f"use at most {MAX_VECTOR_MEMBERS} shards, or the 'vote' or 'members' variant")
        patterns = np.arange(2 ** k)
        bits = (patterns[None, :] >> np.arange(k)[:, None]) & 1  # [K, 2^K]
        default = 2 * bits.sum(0) > k  # the pattern's majority (a tie: no lean)
        default = np.where(2 * bits.sum(0) == k, 0.5, default)
        table = fit_equalized_odds(vote_vector(margins), y, group, 2 ** k, groups, default=default)
    elif variant == "members":
        table = np.stack([fit_equalized_odds(d, y, group, 2, groups, default=np.array([0, 1]))
                          for d in decisions(margins)])
    else:
        raise UndoError(f"unknown post-processing variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return {"variant": variant, "members": k, "groups": groups, "table": table.tolist()}


def predict_proba(margins: np.ndarray, group: np.ndarray, post: Optional[dict[str, Any]] = None) -> np.ndarray:
    """[n] P(Y~ = 1): the members' majority vote (one member: its decision), post-processed by `post`."""
    margins = np.asarray(margins, dtype=float)
    group = np.asarray(group, dtype=int)
    if post is None:
        return majority_vote(margins).astype(float)
    if post["members"] != margins.shape[0]:
        raise UndoError(f"this post-processor was fitted for {post['members']} members, the model has "
                        f"{margins.shape[0]}; fit it again on this model")
    table = np.asarray(post["table"], dtype=float)
    if post["variant"] == "vote":
        return table[group, majority_vote(margins)]
    if post["variant"] == "vector":
        return table[group, vote_vector(margins)]
    if post["variant"] == "members":
        d = decisions(margins)
        return majority_probability(np.stack([table[k, group, d[k]] for k in range(len(d))]))
    raise UndoError(f"unknown post-processing variant {post['variant']!r}; choose one of {', '.join(VARIANTS)}")


def expected_accuracy(prob: np.ndarray, y: np.ndarray) -> float:
    """Mean P(Y~ = y): the accuracy expected over the predictor's coins."""
    prob, y = np.asarray(prob, dtype=float), np.asarray(y, dtype=int)
    return float(np.mean(np.where(y == 1, prob, 1 - prob)))


def group_rates(prob: np.ndarray, y: np.ndarray, group: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Expected accuracy, each group's TPR and FPR (tpr_<name>, fpr_<name>), and the equalized-odds
    gap max(|dTPR|, |dFPR|) with its parts (the largest difference between any two groups)."""
    prob, y, group = np.asarray(prob, dtype=float), np.asarray(y, dtype=int), np.asarray(group, dtype=int)
    out = {"acc": expected_accuracy(prob, y)}
    tpr, fpr = [], []
    for a, name in enumerate(names):
        pos, neg = (group == a) & (y == 1), (group == a) & (y == 0)
        tpr.append(float(prob[pos].mean()) if pos.any() else float("nan"))
        fpr.append(float(prob[neg].mean()) if neg.any() else float("nan"))
        out[f"tpr_{name}"], out[f"fpr_{name}"] = tpr[-1], fpr[-1]
    out["dtpr"] = float(np.nanmax(tpr) - np.nanmin(tpr))
    out["dfpr"] = float(np.nanmax(fpr) - np.nanmin(fpr))
    out["eo_gap"] = max(out["dtpr"], out["dfpr"])
    return out
