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


# ---------------------------------------------------------------- the chunked vocabulary losses

def naive_forward_kl(teacher, student, mask, temperature=1.0):
    """The one-line form the chunked forward_kl replaces (four float32 [B, T, V] tensors)."""
    t_logp = torch.log_softmax(teacher.float() / temperature, dim=-1)
    s_logp = torch.log_softmax(student.float() / temperature, dim=-1)
    return masked_mean((t_logp.exp() * (t_logp - s_logp)).sum(-1), mask)


def naive_soft_cross_entropy(target, student, mask):
    return masked_mean(-(torch.softmax(target.float(), -1) * torch.log_softmax(student.float(), -1)).sum(-1), mask)


def naive_uniform_kl(logits, mask):
    return masked_mean(-math.log(logits.shape[-1]) - torch.log_softmax(logits.float(), -1).mean(-1), mask)


def value_and_grad(fn, student):
    x = student.clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("shape,dtype", [((3, 7, 11), torch.float32), ((4, 33, 1001), torch.float32),
                                         ((3, 7, 11), torch.bfloat16)])
@pytest.mark.parametrize("chunk_elements,keep", [(1, 0), (40, 0), (40, 2**30), (2**30, 0)])  # positions a chunk: one, a few, all
def test_chunked_losses_are_bitwise_the_one_line_forms(monkeypatch, shape, dtype, chunk_elements, keep):
    import undo.losses as losses

    monkeypatch.setattr(losses, "DENSE_ELEMENTS", 0)  # the chunked form even for these small logits
    monkeypatch.setattr(losses, "KEEP_ELEMENTS", keep)  # recompute chunks in backward, or keep them
    monkeypatch.setitem(losses.CHUNK_ELEMENTS, "cpu", chunk_elements)
    g = torch.Generator().manual_seed(7)
    teacher = (torch.randn(*shape, generator=g) * 3).to(dtype)
    student = (torch.randn(*shape, generator=g) * 3).to(dtype)
    mask = torch.rand(shape[:2], generator=g) > 0.3
    tokens = torch.randint(0, shape[2], shape[:2], generator=g)
    lowered = teacher.float().clone()  # UNDIAL's targets written out: b off each position's token
    for b, t in mask.nonzero().tolist():
        lowered[b, t, tokens[b, t]] -= 2.5
    pairs = [
        (lambda s: naive_forward_kl(teacher, s, mask), lambda s: forward_kl(teacher, s, mask)),
        (lambda s: naive_forward_kl(teacher, s, mask, 0.7), lambda s: forward_kl(teacher, s, mask, 0.7)),
        (lambda s: naive_soft_cross_entropy(teacher, s, mask), lambda s: soft_cross_entropy(teacher, s, mask)),
        (lambda s: naive_uniform_kl(s, mask), lambda s: uniform_kl(s, mask)),
        (lambda s: naive_soft_cross_entropy(lowered, s, mask), lambda s: soft_cross_entropy(teacher, s, mask, (tokens, 2.5))),
    ]
    for naive, chunked in pairs:
        v0, g0 = value_and_grad(naive, student)
        v1, g1 = value_and_grad(chunked, student)
        assert torch.equal(v0, v1) and torch.equal(g0, g1)
        assert g1.dtype == student.dtype
    # a strided view of wider logits (a joined forward's slice) gives the same numbers
    wide = torch.cat([student, student[:, :2]], dim=1)
    v2, g2 = value_and_grad(lambda w: forward_kl(teacher, w[:, :shape[1]], mask), wide)
    assert torch.equal(v2, value_and_grad(lambda s: naive_forward_kl(teacher, s, mask), student)[0])
    assert torch.equal(g2[:, :shape[1]], value_and_grad(lambda s: naive_forward_kl(teacher, s, mask), student)[1])


def test_small_logits_take_the_one_line_form_to_the_same_bits():
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    v0, g0 = value_and_grad(lambda s: naive_forward_kl(teacher, s, mask, 2.0), student)
    v1, g1 = value_and_grad(lambda s: forward_kl(teacher, s, mask, 2.0), student)
    assert torch.equal(v0, v1) and torch.equal(g0, g1)


def test_chunked_losses_handle_empty_masks_and_no_grad(monkeypatch):
    import undo.losses as losses

    monkeypatch.setattr(losses, "DENSE_ELEMENTS", 0)
    teacher, student = logits_fixture(0), logits_fixture(1)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    x = student.clone().requires_grad_()
    loss = forward_kl(teacher, x, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    with torch.no_grad():
        assert forward_kl(teacher, student, scored_positions(LABELS)).item() > 0


def test_forward_kl_never_builds_a_float32_batch_by_vocabulary_tensor(monkeypatch):
    """Forward: no tensor of B*T*V elements (the one-line form builds four); backward: only
    the student's gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import undo.losses as losses

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() >= full and t.untyped_storage().data_ptr() not in inputs:
                    self.big.add(t.untyped_storage().data_ptr())  # views of the logits are not new tensors
            return out

    monkeypatch.setattr(losses, "DENSE_ELEMENTS", 0)  # as for a large vocabulary
    monkeypatch.setattr(losses, "KEEP_ELEMENTS", 0)
    monkeypatch.setitem(losses.CHUNK_ELEMENTS, "cpu", 4 * 64)  # 4 positions a chunk
    shape = (4, 16, 64)
    full = shape[0] * shape[1] * shape[2]
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g).requires_grad_()
    mask = torch.ones(shape[:2], dtype=torch.bool)
    inputs = {teacher.untyped_storage().data_ptr(), student.untyped_storage().data_ptr()}
    with Sizes() as forward:
        loss = forward_kl(teacher, student, mask)
    assert not forward.big
    with Sizes() as backward:
        loss.backward()
    assert len(backward.big) == 1
    with Sizes() as naive:
        naive_forward_kl(teacher, student, mask)
    assert len(naive.big) >= 4  # what the test would have seen before
