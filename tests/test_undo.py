import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from undo.errors import UndoError
from undo.losses import forward_kl
from undo.stages.undo import distill_loss_fn, noise_, retain_recovered, xavier_uniform_like


def toy_model(tied=True):
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_noise_formula_exact_values():
    model = toy_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alpha, beta, seed = 0.3, 0.1, 7
    noise_(model, alpha, beta, seed)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # same order the noise step uses
        if p.ndim >= 2:
            fan_out, fan_in = p.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            noise = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
            expected = (1 - alpha) * before[name] + alpha * beta * noise
        else:  # norm scales and biases only shrink
            expected = (1 - alpha) * before[name]
        assert torch.allclose(p, expected, atol=1e-7), name


def test_noise_handles_tied_embeddings_once_and_is_seeded():
    a, b, c = toy_model(), toy_model(), toy_model()
    noise_(a, 0.5, 0.1, seed=1)
    noise_(b, 0.5, 0.1, seed=1)
    noise_(c, 0.5, 0.1, seed=2)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    emb_before = toy_model().model.embed_tokens.weight
    # shrunk once by (1 - alpha), not twice: the residual after removing the noise has the right scale
    ratio = (a.model.embed_tokens.weight - 0.05 * xavier_uniform_like(emb_before, torch.Generator().manual_seed(1))) / emb_before
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_alpha_out_of_range():
    with pytest.raises(UndoError, match="outside"):
        noise_(toy_model(), 1.5, 0.1, 0)


def test_alpha_zero_is_identity_and_one_with_beta_zero_is_zero():
    model, ref = toy_model(), toy_model()
    noise_(model, 0.0, 0.1, 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    noise_(model, 1.0, 0.0, 0)
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


def test_forward_kl_by_hand_with_padding():
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    s = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [9.0, -9.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])  # the last position is padding
    kls = []
    for pos in range(2):
        p = torch.softmax(t[0, pos], -1)
        q = torch.softmax(s[0, pos], -1)
        kls.append(sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(3)))
    expected = sum(kls) / 2
    assert forward_kl(t, s, mask).item() == pytest.approx(float(expected), rel=1e-5)


def test_teacher_logits_computed_once_per_batch():
    teacher, student = toy_model(), toy_model(tied=False)
    calls = {"n": 0}
    teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    loss_fn = distill_loss_fn(teacher, 1.0)
    ids = torch.randint(0, 11, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = loss_fn(student, {"train": batch})
    out.loss.backward()
    assert calls["n"] == 1
    assert all(p.grad is None for p in teacher.parameters())
    assert out.extra_flops > 0 and out.loss.item() > 0


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: the loss is then plain arithmetic."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits})()


def test_distill_loss_counts_only_positions_that_predict_a_real_token(monkeypatch):
    """Row 0 has 3 real tokens, row 1 has 2 (then padding). Position t predicts token t+1, so
    the KL falls on (0, 0), (0, 1) and (1, 0) only: not on the padding, and not on a row's last
    real position, whose prediction is of nothing in the data."""
    import undo.stages.undo as undo_stage

    monkeypatch.setattr(undo_stage, "non_embedding_params", lambda model: 0)
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}

    def kl(b, pos):
        p, q = torch.softmax(t[b, pos], -1), torch.softmax(s[b, pos], -1)
        return sum(p[v].item() * (math.log(p[v].item()) - math.log(q[v].item())) for v in range(3))

    expected = (kl(0, 0) + kl(0, 1) + kl(1, 0)) / 3
    loss = distill_loss_fn(FixedLogits(t), 1.0)(FixedLogits(s), {"train": batch}).loss
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for b, pos in ((0, 2), (0, 3), (1, 1), (1, 2), (1, 3)):  # the last real position and the padding
        t[b, pos], s[b, pos] = torch.tensor([9.0, -9.0, 0.0]), torch.tensor([-9.0, 9.0, 3.0])
    again = distill_loss_fn(FixedLogits(t), 1.0)(FixedLogits(s), {"train": batch}).loss
    assert again.item() == pytest.approx(expected, rel=1e-5)


def test_stop_rule():
    acc = retain_recovered("absolute", 0.05, True, teacher_value=0.9)
    assert acc({"r": 0.86}, "r") and not acc({"r": 0.84}, "r")
    ce = retain_recovered("relative", 0.05, False, teacher_value=2.0)
    assert ce({"r": 2.09}, "r") and not ce({"r": 2.11}, "r")
    assert not retain_recovered("none", 0.05, True, 0.9)({"r": 1.0}, "r")
