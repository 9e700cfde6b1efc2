"""Each loss primitive against a value computed by hand (plain Python arithmetic on lists)."""

import math

import pytest
import torch

from undo.losses import (forward_kl, gaussian_mmd, masked_mean, masked_mse, scored_positions, scored_token_counts,
                         sequence_logprob, soft_cross_entropy, uniform_kl)

IGNORE = -100


def log_softmax_list(row, temperature=1.0):
    xs = [x / temperature for x in row]
    m = max(xs)
    log_z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - log_z for x in xs]


def logits_fixture(seed=0, shape=(2, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2


# Row 0: BOS, 2 prompt tokens (unscored), 1 completion token; row 1: BOS, 2 scored tokens, padding.
LABELS = torch.tensor([[IGNORE, IGNORE, IGNORE, 3],
                       [IGNORE, 1, 4, IGNORE]])
INPUT_IDS = torch.tensor([[0, 2, 2, 3],
                          [0, 1, 4, 0]])


def test_scored_positions_follow_next_token_labels():
    mask = scored_positions(LABELS)
    assert mask.tolist() == [[False, False, True, False], [True, True, False, False]]
    assert scored_token_counts(LABELS).tolist() == [1, 2]


def test_forward_kl_matches_hand_computation_on_masked_positions():
    teacher, student = logits_fixture(0), logits_fixture(1)
    mask = scored_positions(LABELS)
    for temperature in (1.0, 2.0):
        total, count = 0.0, 0
        for b in range(2):
            for t in range(4):
                if not mask[b, t]:
                    continue
                lt = log_softmax_list(teacher[b, t].tolist(), temperature)
                ls = log_softmax_list(student[b, t].tolist(), temperature)
                total += sum(math.exp(a) * (a - c) for a, c in zip(lt, ls))
                count += 1
        expected = total / count
        got = forward_kl(teacher, student, mask, temperature).item()
        assert got == pytest.approx(expected, rel=1e-5)
    assert forward_kl(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_ignores_unmasked_positions():
    teacher, student = logits_fixture(0), logits_fixture(1)
    mask = scored_positions(LABELS)
    changed = student.clone()
    changed[~mask] += torch.randn_like(changed[~mask]) * 10  # garbage where nothing is scored
    assert forward_kl(teacher, changed, mask).item() == pytest.approx(forward_kl(teacher, student, mask).item())


def test_uniform_kl_matches_hand_computation_and_is_zero_for_uniform():
    logits = logits_fixture(2)
    mask = scored_positions(LABELS)
    vocab = logits.shape[-1]
    values = []
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                logp = log_softmax_list(logits[b, t].tolist())
                values.append(sum((1 / vocab) * (math.log(1 / vocab) - lp) for lp in logp))
    assert uniform_kl(logits, mask).item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert uniform_kl(torch.full((2, 4, 5), 3.0), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_logprob_sums_only_scored_tokens_per_row():
    logits = logits_fixture(3)
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(3):  # position t predicts label t + 1
            label = LABELS[b, t + 1].item()
            if label != IGNORE:
                total += log_softmax_list(logits[b, t].tolist())[label]
        expected.append(total)
    assert sequence_logprob(logits, LABELS).tolist() == pytest.approx(expected, rel=1e-5)


def test_soft_cross_entropy_matches_hand_computation():
    target, student = logits_fixture(4), logits_fixture(5)
    mask = scored_positions(LABELS)
    values = []
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                q = [math.exp(x) for x in log_softmax_list(target[b, t].tolist())]
                ls = log_softmax_list(student[b, t].tolist())
                values.append(-sum(qi * li for qi, li in zip(q, ls)))
    assert soft_cross_entropy(target, student, mask).item() == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_masked_mse_averages_over_real_tokens_and_features():
    x = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[0.0, 0.0], [9.0, 9.0]]])
    y = torch.tensor([0.5, -1.0])  # broadcast target, as RMU's c * u
    mask = torch.tensor([[True, True], [True, False]])
    # (0.5^2 + 3^2)/2, (2.5^2 + 6^2)/2, (0.5^2 + 1^2)/2 -> mean of the three
    expected = ((0.25 + 9) / 2 + (6.25 + 36) / 2 + (0.25 + 1) / 2) / 3
    assert masked_mse(x, y, mask).item() == pytest.approx(expected)


def test_masked_mean_of_empty_mask_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_gaussian_mmd_matches_hand_computation():
    x = [[0.0, 1.0], [2.0, 0.5]]
    y = [[1.0, 1.0], [-1.0, 0.0], [0.5, 2.0]]
    pts = x + y
    n_all = len(pts)
    d2 = [[sum((a - b) ** 2 for a, b in zip(p, q)) for q in pts] for p in pts]
    scale = sum(map(sum, d2)) / (n_all * n_all - n_all)
    widths = [scale / 2.0 ** 2 * 2.0 ** i for i in range(5)]
    k = [[sum(math.exp(-d2[i][j] / w) for w in widths) for j in range(n_all)] for i in range(n_all)]

    def mean(block):
        return sum(block) / len(block)

    xx = mean([k[i][j] for i in range(2) for j in range(2)])
    yy = mean([k[i][j] for i in range(2, 5) for j in range(2, 5)])
    xy = mean([k[i][j] for i in range(2) for j in range(2, 5)])
    expected = xx + yy - 2 * xy
    got = gaussian_mmd(torch.tensor(x), torch.tensor(y)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_gaussian_mmd_of_identical_samples_is_zero_with_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 3.0]], requires_grad=True)
    mmd = gaussian_mmd(x, x.detach().clone())
    mmd.backward()
    assert mmd.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(x.grad).all()


def test_next_token_positions_are_the_attention_mask_shifted_like_the_logits():
    from undo.losses import next_token_positions

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    # position t counts when tokens t and t+1 are both real: a row's last real position never does
    assert next_token_positions(right).tolist() == [[True, True, False, False], [True, False, False, False],
                                                    [True, True, True, False]]
    left = torch.tensor([[0, 0, 1, 1]])  # left padding: the pad before the first token predicts nothing of the row
    assert next_token_positions(left).tolist() == [[False, False, True, False]]
