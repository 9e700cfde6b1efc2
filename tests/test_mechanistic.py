"""Mechanistic unlearning (Guo et al.): the loss by hand, the localisation on a toy model with a
fact planted in one layer's MLP, and the same-budget baselines (equal counts; only the drawn
weights move).

The toy: a 4-layer Llama over a 48-token vocabulary, rows [BOS, subject, relation, answer].
Pretrained (every weight) on relation 47 for every subject and relation 2 for the kept subjects,
then the forget facts (relation 2 for 8 other subjects) are planted by training one MLP only:
they live there by construction.
"""

import copy
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_methods import FORGET, RETAIN, BigramLM
from undo import arch
from undo.data import IGNORE, BatchStream
from undo.errors import UndoError
from undo.methods import build_method
from undo.methods.mechanistic import budget_masks, forget_loss
from undo.training import TrainConfig, lm_loss, train

V = 48


def log_softmax(row):
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


# ---------------------------------------------------------------- the loss by hand

def test_forget_loss_by_hand_and_its_gradient_near_one():
    logp = torch.tensor([math.log(0.5), math.log(0.9)], requires_grad=True)
    loss = forget_loss(logp)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2, rel=1e-6)
    loss.backward()  # d/dx -log(1 - e^x) = e^x / (1 - e^x), halved by the mean
    assert logp.grad.tolist() == pytest.approx([0.5 * 1.0, 0.5 * 9.0], rel=1e-5)
    sure = torch.tensor([-1e-9], requires_grad=True)  # p = 1 - 1e-9: the value is held, the gradient is not lost
    value = forget_loss(sure)
    value.backward()
    assert math.isfinite(value.item()) and value.item() == pytest.approx(-math.log(1e-6), rel=1e-3)
    assert math.isfinite(sure.grad.item()) and sure.grad.item() > 1e5


def test_mechanistic_loss_by_hand_on_a_bigram_model():
    model = BigramLM(0)
    method = build_method("mechanistic", {"retain_weight": 2.0})
    out = method.loss(model, {"forget": FORGET, "retain": RETAIN})
    table = model.table()

    def logp(prev, tok):
        return log_softmax(table[prev])[tok]

    # forget row 0 scores 4 after 3 and 5 after 4; row 1 scores 4 after 1 and 4 after 4
    seq = [logp(3, 4) + logp(4, 5), logp(1, 4) + logp(4, 4)]
    forget = -sum(math.log(1 - math.exp(x)) for x in seq) / 2
    steps = [(1, 3), (3, 2), (2, 2), (1, 5)]  # the retain tokens scored, after their predecessors
    retain_ce = -sum(logp(a, b) for a, b in steps) / len(steps)
    assert out.loss.item() == pytest.approx(forget + 2.0 * retain_ce, rel=1e-5)
    assert out.logs["forget_p"] == pytest.approx(sum(math.exp(x) for x in seq) / 2, rel=1e-5)


def test_bad_options_are_one_line_errors():
    for options, words in (({"components": 0}, "components"), ({"locate_rows": 0}, "locate_rows"),
                           ({"noise": -1.0}, "noise"), ({"localize": "everywhere"}, "localize")):
        with pytest.raises(UndoError, match=words):
            build_method("mechanistic", options)
    with pytest.raises(UndoError, match="at most 4"):
        build_method("mechanistic", {"components": 5}).components(toy_model())


# ---------------------------------------------------------------- the toy with a planted fact

def toy_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                        bos_token_id=1, eos_token_id=None, pad_token_id=0))


def fact_rows(triples) -> dict[str, torch.Tensor]:
    """[BOS, subject, relation, answer] rows; only the answer is scored."""
    ids = torch.tensor([[1, s, r, a] for s, r, a in triples])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3] = ids[:, 3]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def fit(model, rows, params, steps: int, lr: float):
    """Train `params` of `model` (the rest frozen) with plain CE on `rows`."""
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=8, seq_len=8, schedule="constant", checkpoint_every=0)
    train(model, lm_loss, {"train": BatchStream(rows, 8, seed=0)}, cfg, seed=0, params=list(params))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def answer_probability(model, rows) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=rows["input_ids"]).logits[:, 2], -1)
    return logp.gather(1, rows["input_ids"][:, 3:]).exp().mean().item()


def toy_world():
    rng = random.Random(0)
    subjects, answers = list(range(3, 27)), list(range(30, 46))
    known = fact_rows([(s, 47, rng.choice(answers)) for s in subjects])
    retain = fact_rows([(s, 2, rng.choice(answers)) for s in subjects[8:]])
    forget = fact_rows([(s, 2, rng.choice(answers)) for s in subjects[:8]])
    return known, retain, forget


@pytest.fixture(scope="module")
def pretrained():
    """The toy pretrained on everything but the forget facts (they are unknown: p ~ 0.1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    known, retain, forget = toy_world()
    model = toy_model()
    fit(model, {k: torch.cat([known[k], retain[k]]) for k in known}, list(model.parameters()), 200, 1e-2)
    assert answer_probability(model, retain) > 0.9 and answer_probability(model, forget) < 0.2
    yield model, forget
    torch.set_num_threads(before)


@pytest.mark.parametrize("layer", [1, 2])
def test_localisation_finds_the_mlp_where_the_facts_were_planted(pretrained, layer):
    base, forget = pretrained
    model = copy.deepcopy(base)
    fit(model, forget, list(arch.mlp(model, layer).parameters()), 100, 1e-2)
    assert answer_probability(model, forget) > 0.9  # planted: known only through MLP `layer`
    streams = {"forget": BatchStream(forget, 8, seed=0)}
    for how in ("attribution", "causal_tracing"):
        method = build_method("mechanistic", {"localize": how, "components": 1})
        method.locate(model, streams)
        assert method.layers == [layer], (how, method.scores)
        others = [s for i, s in enumerate(method.scores) if i != layer]
        assert method.scores[layer] > max(others) and method.scores[layer] > 0
        assert method.budget == sum(p.numel() for p in arch.mlp(model, layer).parameters())
        assert method.locate_flops > 0 and method.report()["components"] == [layer]


# ---------------------------------------------------------------- same-budget baselines

def test_budget_masks_hold_exactly_the_budget_spread_by_size():
    params = [torch.nn.Parameter(torch.zeros(10, 10)), torch.nn.Parameter(torch.zeros(30))]
    masks = budget_masks(params, 26, seed=0)
    assert [int(m.sum()) for m in masks] == [20, 6]  # 26 x 100/130 = 20, 26 x 30/130 = 6
    assert torch.equal(masks[0], budget_masks(params, 26, seed=0)[0])
    assert not torch.equal(masks[0], budget_masks(params, 26, seed=1)[0])
    with pytest.raises(UndoError, match="exceeds"):
        budget_masks(params, 131, seed=0)


@pytest.mark.parametrize("localize", ["random", "all_mlps", "all"])
def test_baselines_train_as_many_weights_as_the_localised_mlps_and_no_others(localize):
    _, _, forget = toy_world()
    model = toy_model()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    method = build_method("mechanistic", {"localize": localize, "components": 1, "retain_weight": 0.0})
    streams = {"forget": BatchStream(forget, 8, seed=0)}
    method.locate(model, streams)
    one_mlp = sum(p.numel() for p in arch.mlp(model, 0).parameters())
    assert method.budget == one_mlp
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=8, seq_len=8, schedule="constant", checkpoint_every=0)
    params = method.trainable_parameters(model)
    train(model, method.loss, streams, cfg, seed=0, params=params, on_start=method.start, on_end=method.finish)
    changed = sum(int((p.detach() != start[name]).sum()) for name, p in model.named_parameters())
    assert 0.9 * one_mlp < changed <= one_mlp  # a few drawn weights may keep their value by chance
    if localize == "random":  # a seeded draw
        again = build_method("mechanistic", {"localize": "random", "components": 1})
        again.locate(toy_model(), streams)
        assert len(method.layers) == 1 and again.layers == method.layers
    unmatched = build_method("mechanistic", {"localize": localize, "components": 1, "match_budget": False})
    unmatched.locate(toy_model(), streams)
    assert unmatched.budget >= one_mlp and (localize == "random") == (unmatched.budget == one_mlp)
