"""PCGU: per-unit cosines and the choice of the k lowest, by hand; the step hook on a bigram toy whose
gradients are written out in plain numbers; and PCGU through the one training loop moving a toy's
stereotype preference toward 50%.

The bigram "language model" (logits at a position = a row of a table indexed by the current
token) has one unit per token: the table's rows. A pair shares the prompt [BOS=1] and differs in
its completion: stereotyped [2, 3], contrast [0, 3]. So log p(stereo) = log p(2|1) + log p(3|2)
and log p(contrast) = log p(0|1) + log p(3|0): row 1 gets both gradients, row 2 only the
stereotyped one, row 0 only the contrast's, row 3 none.
"""

import math

import pytest
import torch

from test_methods import BigramLM
from undo.config import from_dict
from undo.data import BatchStream
from undo.errors import UndoError
from undo.losses import sequence_logprob
from undo.methods import build_method
from undo.methods.pcgu import PCGUOptions, count_units, lowest_units, masked_gradient, unit_cosines
from undo.training import TrainConfig, train

IGNORE = -100
V = 4


def pair_batches(rows: int = 1) -> dict:
    stereo = {"input_ids": torch.tensor([[1, 2, 3]] * rows), "attention_mask": torch.ones(rows, 3, dtype=torch.long),
              "labels": torch.tensor([[IGNORE, 2, 3]] * rows)}
    contrast = {"input_ids": torch.tensor([[1, 0, 3]] * rows), "attention_mask": torch.ones(rows, 3, dtype=torch.long),
                "labels": torch.tensor([[IGNORE, 0, 3]] * rows)}
    return {"forget": stereo, "contrast": contrast}


def zero_bigram() -> BigramLM:
    model = BigramLM(0, vocab=V)
    with torch.no_grad():
        model.embed.weight.zero_()  # every next-token distribution uniform: gradients are e_y - 1/4
    return model


def run_hook(method, model):
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    batches = pair_batches()
    out = method.step_hook()(model, optimizer, lambda: method.loss(model, batches))
    return out, params[0].grad


def test_cosines_per_row_and_per_vector_and_the_k_lowest_by_hand():
    # matrix: row 0 agrees (cos 1), row 1 opposes (cos -1); vector: orthogonal (cos 0)
    g_adv = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.0, 2.0])]
    g_dis = [torch.tensor([[3.0, 0.0], [-1.0, 0.0]]), torch.tensor([5.0, 0.0])]
    cos = unit_cosines(g_adv, g_dis)
    assert cos[0].tolist() == pytest.approx([1.0, -1.0]) and cos[1].tolist() == pytest.approx([0.0])
    assert [m.tolist() for m in lowest_units(cos, 1)] == [[False, True], [False]]
    assert [m.tolist() for m in lowest_units(cos, 2)] == [[False, True], [True]]
    masks = lowest_units(cos, 2)
    assert masked_gradient(g_adv[0], masks[0]).tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert masked_gradient(g_adv[1], masks[1]).tolist() == [0.0, 2.0]
    assert count_units([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))]) == 4


def test_a_unit_without_advantaged_gradient_is_never_chosen_and_a_missing_gradient_is_skipped():
    g_adv = [torch.tensor([[0.0, 0.0], [1.0, 1.0]]), None]
    g_dis = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0])]
    cos = unit_cosines(g_adv, g_dis)
    assert math.isinf(cos[0][0]) and cos[0][1] == pytest.approx(1.0) and cos[1] is None
    masks = lowest_units(cos, 5)  # k beyond the units that can move: only those
    assert masks[0].tolist() == [False, True] and masks[1] is None


def test_the_hook_applies_the_advantaged_gradient_on_the_lowest_cosine_unit_only():
    """Uniform model: both sequences have log p = 2 log(1/4); a tie makes the stereotyped one advantaged.
    Row 1: g_adv = e2 - 1/4, g_dis = e0 - 1/4: cos = (-1/4) / (3/4) = -1/3, the lowest; row 2: g_adv = e3 - 1/4,
    g_dis = 0: cos 0; row 0: g_adv = 0 (never chosen); row 3: no gradient."""
    method = build_method("pcgu", {"k": 1}, "bias")
    model = zero_bigram()
    out, grad = run_hook(method, model)
    assert out.loss.item() == pytest.approx(2 * math.log(0.25))
    assert grad[1].tolist() == pytest.approx([-0.25, -0.25, 0.75, -0.25])
    assert grad[[0, 2, 3]].abs().sum().item() == 0.0
    assert method.chosen_units == [1]

    method2 = build_method("pcgu", {"k": 2}, "bias")
    _, grad2 = run_hook(method2, zero_bigram())
    assert grad2[2].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])  # row 2 (cos 0) comes next
    assert grad2[[0, 3]].abs().sum().item() == 0.0


def test_the_advantaged_sequence_is_the_one_the_model_prefers_unless_told_the_stereotype():
    model = zero_bigram()
    with torch.no_grad():
        model.embed.weight[1, 0] = 2.0  # p(0 | 1) up: the contrast is now more likely
    _, grad = run_hook(build_method("pcgu", {"k": 1}, "bias"), model)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0]), 0)
    assert grad[1].tolist() == pytest.approx((torch.eye(V)[0] - p).tolist())  # the contrast's gradient
    _, grad = run_hook(build_method("pcgu", {"k": 1, "advantaged": "stereotype"}, "bias"), model)
    assert grad[1].tolist() == pytest.approx((torch.eye(V)[2] - p).tolist())


def test_one_sgd_step_lowers_the_advantaged_log_probability():
    method = build_method("pcgu", {"k": 1}, "bias")
    model = zero_bigram()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    batches = pair_batches()
    before = method.loss(model, batches).loss.item()
    method.step_hook()(model, optimizer, lambda: method.loss(model, batches))
    optimizer.step()
    stereo, contrast = [sequence_logprob(model(input_ids=b["input_ids"]).logits, b["labels"]).item()
                        for b in (batches["forget"], batches["contrast"])]
    assert stereo < before and contrast > before  # row 1 moved from "2" toward the others


def test_pcgu_in_the_training_loop_moves_a_preference_toward_fifty_percent():
    """A bigram toy that prefers the stereotyped completion in 8 pairs (4 prompts): PCGU's SGD steps on
    k = 2 of the 6 rows (the advantaged side chosen afresh each step) leave every pair nearly tied."""
    v = 6
    model = BigramLM(3, vocab=v)
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, 2] = 1.0   # every context prefers token 2 (the "stereotyped" word) over 3
    prompts = [0, 1, 4, 5] * 2
    stereo = {"input_ids": torch.tensor([[p, 2] for p in prompts]), "labels": torch.tensor([[IGNORE, 2]] * 8),
              "attention_mask": torch.ones(8, 2, dtype=torch.long)}
    contrast = {**stereo, "input_ids": torch.tensor([[p, 3] for p in prompts]),
                "labels": torch.tensor([[IGNORE, 3]] * 8)}

    def gaps(m) -> torch.Tensor:  # log p(stereotyped) - log p(contrast), per pair
        with torch.no_grad():
            s, c = [sequence_logprob(m(input_ids=b["input_ids"]).logits, b["labels"]) for b in (stereo, contrast)]
        return s - c

    assert gaps(model).tolist() == pytest.approx([1.0] * 8)  # every pair prefers the stereotype by a logit of 1
    method = build_method("pcgu", {"k": 2}, "bias")
    streams = {"forget": BatchStream(stereo, 8, seed=0), "contrast": BatchStream(contrast, 8, seed=0)}
    cfg = from_dict(TrainConfig, {**method.train_defaults, "steps": 40, "lr": 1.0, "checkpoint_every": 0}, "t")
    result = train(model, method.loss, streams, cfg, seed=0, step_hook=method.step_hook())
    assert cfg.optimizer == "sgd" and result.steps == 40
    assert gaps(model).abs().max() < 0.25  # every pair (nearly) tied: the preference sits at the 50% line
    assert all(n == 2 for n in method.chosen_units)


def test_options_and_needs():
    method = build_method("pcgu", {}, "bias")
    assert method.needs() == {"forget", "contrast"} and method.row_format == "padded"
    assert method.train_defaults["optimizer"] == "sgd" and method.options.k == 10000
    with pytest.raises(UndoError, match="k_fraction"):
        from_dict(PCGUOptions, {"k_fraction": 1.5}, "o")
    with pytest.raises(UndoError, match="k must"):
        from_dict(PCGUOptions, {"k": 0}, "o")
    frac = build_method("pcgu", {"k_fraction": 0.5}, "bias")
    units = [torch.nn.Parameter(torch.zeros(6, 2)), torch.nn.Parameter(torch.zeros(2))]  # 6 rows + 1 vector
    assert frac.units_per_step(units) == 4  # round(0.5 x 7)
