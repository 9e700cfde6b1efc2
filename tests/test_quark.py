"""Quark: quantile tokens by reward rank, the loss against a hand computation, the pool's rows,
the export that folds r_1 into BOS exactly, and one short run that lowers the toxicity rate."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from undo.data import IGNORE
from undo.errors import UndoError
from undo.methods.base import build_method
from undo.methods.quark import QuarkPool, Sample, init_reward_embeddings, quantile_tokens, quark_loss
from undo.rewards import sample_continuations
from undo.stages.unlearn import build_streams, train_config
from undo.tokenization import train_tokenizer
from undo.training import train

from test_toxicity import small_task, trained


def test_quantile_tokens_follow_the_reward_rank():
    # ranks (best first): 0.9 -> r_1, 0.7 -> r_2, 0.5 -> r_3, 0.3 -> r_4, 0.1 -> r_5
    assert quantile_tokens([0.1, 0.9, 0.5, 0.3, 0.7], 5).tolist() == [4, 0, 2, 3, 1]
    # 7 samples in 3 parts of 3, 2, 2; the tie (0.8, 0.8) keeps pool order
    assert quantile_tokens([0.2, 0.8, 0.5, 0.8, 0.0, 0.6, 0.4], 3).tolist() == [2, 0, 1, 0, 2, 0, 1]


def test_quark_loss_by_hand():
    # one scored position; policy p = (1/4, 3/4), reference q = (1/2, 1/2), the label is token 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    ref_logits = torch.zeros(1, 2, 2)
    labels = torch.tensor([[IGNORE, 1]])
    loss, logs = quark_loss(logits, ref_logits, labels, kl_weight=0.05, entropy_weight=0.06)
    ce = -math.log(0.75)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert logs["ce"] == pytest.approx(ce) and logs["kl"] == pytest.approx(kl)
    assert logs["entropy"] == pytest.approx(entropy)
    assert loss.item() == pytest.approx(ce + 0.05 * kl - 0.06 * entropy)


def test_new_reward_embeddings_are_drawn_from_the_rows_mean_and_std():
    weight = torch.randn(500, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([5.0, -1.0, 0.0, 2.0])
    rows = init_reward_embeddings(weight, 4000, seed=0)
    assert torch.allclose(rows.mean(0), weight.mean(0), atol=0.15)
    assert torch.allclose(rows.std(0), weight.std(0), rtol=0.06)
    assert torch.equal(rows, init_reward_embeddings(weight, 4000, seed=0))


def test_pool_rows_put_the_reward_token_where_bos_stands():
    tok = SimpleNamespace(pad_token_id=0, bos_token_id=1)
    method = SimpleNamespace(tok=tok, bos_id=1, reward_ids=[10, 11], options=SimpleNamespace(explore_every=5))
    pool = QuarkPool(method, [[5, 6]], batch_size=2, seed=0)
    pool.samples = [Sample([5, 6], [7, 8, 2], 0.1), Sample([5], [9], 0.9)]
    pool.tokens = quantile_tokens([s.reward for s in pool.samples], 2)
    rows = pool.rows([0, 1])
    assert rows["input_ids"].tolist() == [[11, 5, 6, 7, 8, 2], [10, 5, 9, 0, 0, 0]]  # the worse sample: r_2
    assert rows["ref_input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 5, 9, 0, 0, 0]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert rows["labels"].tolist() == [[IGNORE] * 3 + [7, 8, 2], [IGNORE, IGNORE, 9, IGNORE, IGNORE, IGNORE]]
    with pytest.raises(UndoError, match="cannot resume at step 3"):
        pool.batch(3)  # a resumed run would meet an empty pool


@pytest.fixture(scope="module")
def toxic_base():
    task = small_task()
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 512)
    return task, tok, trained(task, tok, ["forget", "retain"], steps=250)


def test_export_folds_r1_into_bos_exactly(toxic_base):
    task, tok, base = toxic_base
    method = build_method("quark", {"quantiles": 3}, "toxicity", seed=0)
    model = method.adapt(copy.deepcopy(base))
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 3 and method.reward_ids[0] == len(tok)
    method.bind_task(task, tok)
    prompt = tok(task.prompts("eval")[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        given_r1 = model(input_ids=torch.tensor([[method.reward_ids[0]] + prompt])).logits[0, :, :len(tok)]
        exported = method.export(model)
        given_bos = exported(input_ids=torch.tensor([[tok.bos_token_id] + prompt])).logits[0]
    assert exported.get_input_embeddings().weight.shape[0] == exported.config.vocab_size == len(tok)
    others = [i for i in range(len(tok)) if i != tok.bos_token_id]  # tied: BOS's output row moved with it
    assert torch.allclose(given_r1[:, others], given_bos[:, others], atol=1e-5)


def test_a_short_quark_run_lowers_the_toxicity_rate(toxic_base):
    task, tok, base = toxic_base
    before = task.evaluate(base, tok)
    method = build_method("quark", {"explore_every": 20, "explore_samples": 64}, "toxicity", seed=0)
    method.attach(reference=copy.deepcopy(base).requires_grad_(False))
    model = method.adapt(copy.deepcopy(base).train())
    method.bind_task(task, tok)
    cfg = train_config(method, {"steps": 100, "batch_size": 16, "lr": 1e-3}, "test")
    streams = build_streams(task, tok, method, cfg, seed=0)
    assert list(streams) == ["quark"]
    train(model, method.loss, streams, cfg, seed=0, on_start=method.start)
    explored = method.report()["explore"]
    assert [e["from"] for e in explored] == ["reference"] + ["policy|r_1"] * 4 and method.report()["pool_size"] == 320
    # it learned the reward tokens: given r_1 it samples better text than given r_K
    prompts = [[token] + tok(p, add_special_tokens=False)["input_ids"] for p in task.prompts("eval")
               for token in (method.reward_ids[0], method.reward_ids[-1])]
    samples = sample_continuations(model, prompts, 14, seed=1, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                   suppress=method.reward_ids)
    rewards = task.reward([tok.decode(s, skip_special_tokens=True) for s in samples])
    assert rewards[0::2].mean() > rewards[1::2].mean() + 0.1
    after = task.evaluate(method.export(model), tok)
    assert before["forget_rate"] >= 0.3 and after["forget_rate"] <= before["forget_rate"] - 0.15
    assert after["mean_reward"] > before["mean_reward"]
    assert after["retain_acc"] > before["retain_acc"] - 0.15  # at a small cost in fluency


def test_quark_needs_a_task_with_prompts_and_a_reward():
    method = build_method("quark", {}, "arithmetic")
    with pytest.raises(UndoError, match="needs prompts and a reward"):
        method.bind_task(SimpleNamespace(name="arithmetic"), SimpleNamespace(bos_token_id=1))
    with pytest.raises(UndoError, match="quantiles must be at least 2"):
        build_method("quark", {"quantiles": 1})
