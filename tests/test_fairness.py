"""Equalized odds (undo.fairness): rates and gap, the majority vote, the Poisson-binomial vote of
randomized members, and Hardt et al.'s linear program against solutions worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from undo import fairness
from undo.errors import UndoError


def block(group: int, label: int, u: int, count: int) -> list[tuple[int, int, int]]:
    return [(group, label, u)] * count


def columns(rows: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g, y, u = (np.array(c) for c in zip(*rows))
    return u, y, g


# (data, the LP's solution x[a, u] = P(Y~=1 | U=u, A=a), the equal TPR and FPR it reaches), worked by hand.
HAND_CASES = {
    # Group 0: 10 positives at U=1, 10 negatives at U=0 (TPR 1, FPR 0). Group 1: positives 5 at U=1
    # and 5 at U=0, 10 negatives at U=0 (TPR 0.5, FPR 0). FPR_1 = x10, so x00 = x10 =: d, and
    # TPR_0 = x01 = (x11 + d) / 2. Errors = 20 - 10 x11 + 10 d: least at x11 = 1, d = 0, so x01 = 1/2.
    "tpr": (block(0, 1, 1, 10) + block(0, 0, 0, 10) + block(1, 1, 1, 5) + block(1, 1, 0, 5) + block(1, 0, 0, 10),
            [[0.0, 0.5], [0.0, 1.0]], 0.5, 0.0),
    # Group 0 as above. Group 1: 10 positives at U=1, negatives 5 at U=1 and 5 at U=0 (TPR 1, FPR 0.5).
    # TPR_1 = x11 = x01, FPR_1 = (x11 + x10) / 2 = x00. Errors = 10(1 - x01) + 10 x00 + 10(1 - x11)
    # + 5 x11 + 5 x10 = 20 - 10 x11 + 10 x10: least at x11 = 1, x10 = 0, so x01 = 1, x00 = 1/2.
    "fpr": (block(0, 1, 1, 10) + block(0, 0, 0, 10) + block(1, 1, 1, 10) + block(1, 0, 1, 5) + block(1, 0, 0, 5),
            [[0.5, 1.0], [0.0, 1.0]], 1.0, 0.5),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_the_lp_equalizes_the_rates_by_the_solution_worked_by_hand(case):
    rows, table, tpr, fpr = HAND_CASES[case]
    u, y, g = columns(rows)
    x = fairness.fit_equalized_odds(u, y, g, values=2, groups=2, default=np.array([0, 1]))
    assert x == pytest.approx(np.array(table), abs=1e-6)
    rates = fairness.group_rates(x[g, u], y, g, ("a", "b"))
    assert rates["tpr_a"] == pytest.approx(tpr) and rates["tpr_b"] == pytest.approx(tpr)
    assert rates["fpr_a"] == pytest.approx(fpr) and rates["fpr_b"] == pytest.approx(fpr)
    assert rates["eo_gap"] == pytest.approx(0.0, abs=1e-6)
    assert rates["acc"] == pytest.approx(0.75)  # both: 10 of 40 wrong at the optimum


def test_rates_and_gap_on_a_small_prediction_worked_by_hand():
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prob = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    r = fairness.group_rates(prob, y, g, ("a", "b"))
    assert (r["tpr_a"], r["tpr_b"], r["fpr_a"], r["fpr_b"]) == (0.5, 1.0, 0.0, 0.75)
    assert (r["dtpr"], r["dfpr"], r["eo_gap"]) == (0.5, 0.75, 0.75)
    assert r["acc"] == pytest.approx((1 + 0 + 1 + 1 + 1 + 1 + 0 + 0.5) / 8)


def test_majority_vote_breaks_ties_by_the_mean_margin():
    margins = np.array([[0.9, -0.2, 0.1], [-0.1, -0.3, 0.2], [0.5, 0.4, -0.6]])  # three members
    assert fairness.majority_vote(margins).tolist() == [1, 0, 1]
    tied = np.array([[0.9, 0.1], [-0.2, -0.6]])  # one yes, one no each: the mean margin decides
    assert fairness.majority_vote(tied).tolist() == [1, 0]
    assert fairness.vote_vector(margins).tolist() == [1 + 4, 4, 1 + 2]


def test_the_vote_of_randomized_members_is_the_poisson_binomial_majority():
    p = np.array([[0.5], [0.5], [0.5]])
    assert fairness.majority_probability(p)[0] == pytest.approx(0.5)
    p = np.array([[0.9], [0.2], [0.6]])  # P(at least 2 of 3)
    want = 0.9 * 0.2 * 0.4 + 0.9 * 0.8 * 0.6 + 0.1 * 0.2 * 0.6 + 0.9 * 0.2 * 0.6
    assert fairness.majority_probability(p)[0] == pytest.approx(want)
    p = np.array([[1.0], [0.0]])  # a tie for sure: a fair coin
    assert fairness.majority_probability(p)[0] == pytest.approx(0.5)


def skewed_ensemble(seed: int, n: int = 600, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members that say yes more often in group 1 whatever the label (an equalized-odds gap)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 2, n)
    y = (rng.random(n) < np.where(g == 1, 0.6, 0.3)).astype(int)
    signal = np.where(y == 1, 0.3, -0.3) + np.where(g == 1, 0.25, -0.25)
    return signal[None, :] + rng.normal(0, 0.3, (k, n)), y, g


@pytest.mark.parametrize("variant", fairness.VARIANTS)
def test_every_variant_narrows_the_gap_on_held_out_data(variant):
    margins, y, g = skewed_ensemble(0)
    test_margins, test_y, test_g = skewed_ensemble(1)
    post = fairness.fit_postprocessor(variant, margins, y, g, groups=2)
    before = fairness.group_rates(fairness.predict_proba(test_margins, test_g), test_y, test_g, ("a", "b"))
    after = fairness.group_rates(fairness.predict_proba(test_margins, test_g, post), test_y, test_g, ("a", "b"))
    assert before["eo_gap"] > 0.25
    assert after["eo_gap"] < before["eo_gap"] / 2
    fitted = fairness.group_rates(fairness.predict_proba(margins, g, post), y, g, ("a", "b"))
    if variant != "members":  # the LP's constraints hold exactly on its own data (members: per member)
        assert fitted["eo_gap"] == pytest.approx(0.0, abs=1e-6)


def test_bad_input_stops_with_one_clear_message():
    u, y, g = columns(block(0, 1, 1, 4) + block(0, 0, 0, 4) + block(1, 1, 1, 4))  # group 1 has no negative
    with pytest.raises(UndoError, match="no negative example in group 1"):
        fairness.fit_equalized_odds(u, y, g, values=2, groups=2)
    margins, y, g = skewed_ensemble(0, k=3)
    post = fairness.fit_postprocessor("vote", margins, y, g, groups=2)
    with pytest.raises(UndoError, match="fitted for 3 members"):
        fairness.predict_proba(margins[:2], g, post)
    with pytest.raises(UndoError, match="unknown post-processing variant"):
        fairness.fit_postprocessor("median", margins, y, g, groups=2)
