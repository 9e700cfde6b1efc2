"""LAU (Yuan et al.): AdvGA and AdvNPO. The perturbation hook against an independent forward, the
ball and the random start by hand, the outer losses by hand for a fixed perturbation, the
adversary's behaviour (it lowers the forget CE it attacks, i.e. raises the unlearning loss, and
stays in its ball), and a short run through the training loop on the toy of test_mechanistic.
"""

import copy
import math

import pytest
import torch

from test_mechanistic import fact_rows, fit, toy_model
from undo.data import IGNORE, BatchStream
from undo.errors import UndoError
from undo.methods import adv_ga, build_method
from undo.methods.adv_ga import adversary_layer, latent_attack, perturbed, project, random_start
from undo.training import TrainConfig, train

FORGET = fact_rows([(3, 2, 30), (4, 2, 31), (5, 2, 33)])
RETAIN = fact_rows([(6, 2, 34), (7, 2, 35)])


def by_hand_logp(logits, labels):
    """[rows]: summed log-probs of the scored tokens, from plain log-softmax."""
    logp = torch.log_softmax(logits.double(), -1)
    total = torch.zeros(len(labels), dtype=torch.float64)
    for r in range(len(labels)):
        for t in range(1, labels.shape[1]):
            if labels[r, t] != IGNORE:
                total[r] += logp[r, t - 1, labels[r, t]]
    return total


def test_project_and_random_start_by_hand():
    delta = torch.tensor([[[3.0, 4.0], [0.3, 0.4]]])  # norms 5 and 0.5
    assert project(delta, 1.0).flatten().tolist() == pytest.approx([0.6, 0.8, 0.3, 0.4])
    points = random_start(torch.Size((4, 50, 8)), 2.0, torch.Generator().manual_seed(0))
    norms = points.norm(dim=-1)
    assert norms.max() <= 2.0 + 1e-6 and norms.min() > 0.5  # uniform in 8 dimensions: radius 2 * U^(1/8)
    assert norms.mean().item() == pytest.approx(2.0 * 8 / 9, abs=0.1)  # E[U^(1/8)] = 8/9


def test_perturbing_layer_zero_equals_perturbing_the_embeddings():
    model = toy_model()
    delta = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1))
    with perturbed(model, 0, delta):
        hooked = model(input_ids=FORGET["input_ids"]).logits
    direct = model(inputs_embeds=model.get_input_embeddings()(FORGET["input_ids"]) + delta).logits
    assert torch.allclose(hooked, direct, atol=1e-5)
    assert not torch.allclose(model(input_ids=FORGET["input_ids"]).logits, hooked, atol=1e-3)  # it did something


def test_adv_ga_and_adv_npo_losses_by_hand_for_a_fixed_perturbation(monkeypatch):
    model, reference = toy_model(0), toy_model(1).requires_grad_(False)
    delta = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(adv_ga, "latent_attack", lambda *args, **kwargs: (delta, 7.0))
    layer = adversary_layer(model, None)
    assert layer == 1  # 4 layers: n // 4
    with torch.no_grad(), perturbed(model, layer, delta):
        forget_logp = by_hand_logp(model(input_ids=FORGET["input_ids"]).logits, FORGET["labels"])
    retain_logp = by_hand_logp(model(input_ids=RETAIN["input_ids"]).logits.detach(), RETAIN["labels"])
    ref_logp = by_hand_logp(reference(input_ids=FORGET["input_ids"]).logits, FORGET["labels"])
    retain_ce = -retain_logp.sum().item() / 2  # one scored token per row
    batches = {"forget": FORGET, "retain": RETAIN}

    out = build_method("adv_ga", {"retain_weight": 3.0}).loss(model, batches)
    assert out.loss.item() == pytest.approx(forget_logp.sum().item() / 3 + 3.0 * retain_ce, rel=1e-5)
    assert out.logs["adv_start_ce"] == 7.0 and out.extra_flops > 0

    npo = build_method("adv_npo", {"beta": 0.5, "retain_weight": 0.0})
    npo.attach(reference=reference)
    out = npo.loss(model, batches)
    ratio = forget_logp - ref_logp
    expected = -(2 / 0.5) * sum(math.log(1 / (1 + math.exp(0.5 * x))) for x in ratio.tolist()) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_adversary_lowers_the_forget_ce_and_stays_in_its_ball():
    model = toy_model()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :2])], 1) for k, v in FORGET.items()}  # 2 padding columns
    padded["labels"][:, 4:] = IGNORE

    def ce_at(delta):
        with torch.no_grad(), perturbed(model, 1, delta):
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        return -by_hand_logp(logits, padded["labels"]).mean().item()

    delta, start_ce = latent_attack(model, padded, 1, epsilon=2.0, steps=6, step_size=0.8,
                                    generator=torch.Generator().manual_seed(0))
    clean = ce_at(torch.zeros_like(delta))
    assert ce_at(delta) < start_ce - 0.1 and ce_at(delta) < clean - 0.1  # the unlearning loss -CE rises
    assert delta.norm(dim=-1).max() <= 2.0 + 1e-5
    assert delta[:, 4:].abs().max() == 0  # padding is not perturbed
    stronger, _ = latent_attack(model, padded, 1, epsilon=2.0, steps=12, step_size=0.8,
                                generator=torch.Generator().manual_seed(0))
    assert ce_at(stronger) <= ce_at(delta) + 1e-4
    wider, _ = latent_attack(model, padded, 1, epsilon=4.0, steps=6, step_size=1.6,
                             generator=torch.Generator().manual_seed(0))
    assert ce_at(wider) < ce_at(delta)
    again, _ = latent_attack(model, padded, 1, epsilon=2.0, steps=6, step_size=0.8,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, delta)  # seeded


def test_adv_ga_trains_through_the_loop_and_counts_the_adversary():
    torch.set_num_threads(1)
    learnt = toy_model()
    fit(learnt, {k: torch.cat([FORGET[k], RETAIN[k]]) for k in FORGET}, list(learnt.parameters()), 60, 1e-2)

    def ce(model, rows):
        with torch.no_grad():
            return -by_hand_logp(model(input_ids=rows["input_ids"]).logits, rows["labels"]).mean().item()

    cfg = TrainConfig(steps=4, lr=3e-3, batch_size=3, seq_len=8, schedule="constant", checkpoint_every=0)
    streams = {"forget": BatchStream(FORGET, 3, seed=0), "retain": BatchStream(RETAIN, 2, seed=1)}
    results = {}
    for name, options in (("graddiff", {}), ("adv_ga", {"epsilon": 1.0})):
        model = copy.deepcopy(learnt)
        method = build_method(name, options)
        method.prepare(model)
        results[name] = (train(model, method.loss, copy.deepcopy(streams), cfg, seed=0), model)
    (plain, _), (adv, model) = results["graddiff"], results["adv_ga"]
    assert adv.steps == 4 and adv.flops > 3 * plain.flops  # 6 PGD steps, each a forward and most of a backward
    assert ce(learnt, FORGET) < 0.5 and ce(model, FORGET) > ce(learnt, FORGET) + 1.0  # forgotten
    assert ce(model, RETAIN) < 1.0  # kept


def test_bad_options_are_one_line_errors():
    for options, words in (({"epsilon": 0.0}, "epsilon"), ({"adv_steps": 0}, "adv_steps"),
                           ({"step_size": -1.0}, "step_size"), ({"retain_weight": -1.0}, "retain_weight")):
        for name in ("adv_ga", "adv_npo"):
            with pytest.raises(UndoError, match=words):
                build_method(name, options)
    with pytest.raises(UndoError, match="out of range"):
        build_method("adv_ga", {"layer": 9}).prepare(toy_model())
