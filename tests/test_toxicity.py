"""The toxicity task: its synthetic world, rewards (hand-computed where they are formulas) and
metrics that move the right way on models trained with and without the behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from undo.data import pad_batch
from undo.errors import UndoError
from undo.metrics import masked_ce
from undo.models import ModelConfig, build_model
from undo.rewards import RepetitionReward, callable_reward, distinct_share
from undo.tasks import TaskConfig, build_task
from undo.tasks.toxicity import distinct_n
from undo.tokenization import train_tokenizer

SMALL = {"people": 12, "train_prompts": 60, "continuations": 4, "eval_prompts": 24, "quick_eval_prompts": 8,
         "samples": 2, "max_new_tokens": 14, "classifier_texts": 600}


def small_task(seed: int = 0, **options):
    return build_task(TaskConfig("toxicity", {**SMALL, **options}), seed)


def half_bad(scores) -> float:
    return float(np.mean(np.asarray(scores) < 0.5))


# ---------------------------------------------------------------- data and rewards

@pytest.mark.parametrize("behaviour", ["toxicity", "sentiment", "repetition"])
def test_forget_continuations_have_the_behaviour_and_retain_ones_do_not(behaviour):
    task = small_task(behaviour=behaviour)
    forget, retain = task.train_examples("forget"), task.train_examples("retain")
    assert len(forget) == len(retain) == 60 * 2  # bad_fraction 0.5 of 4 continuations per prompt
    assert {ex.prompt for ex in forget} == {ex.prompt for ex in retain} == set(task.prompts("train"))
    assert not set(task.prompts("train")) & set(task.prompts("eval"))  # evaluation prompts are held out
    assert half_bad(task.reward([ex.completion for ex in forget])) == 1.0
    assert half_bad(task.reward([ex.completion for ex in retain])) == 0.0
    assert small_task(behaviour=behaviour).train_examples("forget") == forget  # seeded
    assert small_task(seed=1, behaviour=behaviour).train_examples("forget") != forget


@pytest.mark.parametrize("behaviour", ["toxicity", "sentiment"])
def test_the_reward_classifier_separates_its_held_out_split(behaviour):
    task = small_task(behaviour=behaviour)
    (bad, good), (held_bad, held_good) = task.classifier_corpus()
    assert not set(held_bad) & set(bad) or len(set(held_bad) - set(bad)) > len(held_bad) // 2
    accuracy = (np.mean(task.reward(held_bad) < 0.5) + np.mean(task.reward(held_good) >= 0.5)) / 2
    assert accuracy >= 0.95


def test_repetition_reward_and_distinct_n_by_hand():
    # "the map the map the map": bigrams (the,map),(map,the),(the,map),(map,the),(the,map): 2 distinct of 5
    assert RepetitionReward()(["the map the map the map", "one two three"]).tolist() == [0.4, 1.0]
    assert distinct_share(["a", "b", "a"], 1) == pytest.approx(2 / 3)
    # per prompt over its samples' words, then the mean: (2/3 + 1/2) / 2
    assert distinct_n([[["a", "b", "a"]], [["c"], ["c"]]], 1) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # prompt 1: bigrams (a,b),(b,a),(a,b): 2/3; prompt 2 has no bigram and is left out
    assert distinct_n([[["a", "b", "a", "b"]], [["c"]]], 2) == pytest.approx(2 / 3)


def constant_reward(texts):
    return [0.25] * len(texts)


def one_score(texts):
    return [0.5]


def test_a_callable_reward_plugs_in_and_bad_options_say_what_to_fix():
    task = small_task(reward="callable", reward_fn="test_toxicity:constant_reward")
    assert task.reward(["x", "y"]).tolist() == [0.25, 0.25]
    with pytest.raises(UndoError, match="reward_fn 'nowhere:fn': cannot import"):
        callable_reward("nowhere:fn")
    with pytest.raises(UndoError, match="reward_model: give a local sequence classifier"):
        small_task(reward="hf")
    with pytest.raises(UndoError, match="bad_fraction must be in"):
        small_task(bad_fraction=1.0)
    with pytest.raises(UndoError, match="one finite score per text"):
        small_task(reward="callable", reward_fn="test_toxicity:one_score").reward(["a", "b"])


# ---------------------------------------------------------------- metrics on trained models

def trained(task, tok, domains, steps: int = 100, seed: int = 0):
    """A tiny model trained `steps` AdamW steps on the task's examples of `domains`."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(preset="tiny"), tok, seed=seed)
    rows = pad_batch(tok, [ex for d in domains for ex in task.train_examples(d)], "all")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(rows["input_ids"].shape[0], (16,), generator=g)
        loss = masked_ce(model(input_ids=rows["input_ids"][idx], attention_mask=rows["attention_mask"][idx]).logits,
                         rows["labels"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def base_and_oracle():
    task = small_task()
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 512)
    return task, tok, trained(task, tok, ["forget", "retain"]), trained(task, tok, ["retain"])


def test_the_base_shows_the_behaviour_and_the_oracle_does_not(base_and_oracle):
    task, tok, base, oracle = base_and_oracle
    b, o = task.evaluate(base, tok), task.evaluate(oracle, tok)
    assert set(task.report_metrics) <= set(b)
    assert 0.25 <= b["forget_rate"] <= 0.75 and o["forget_rate"] <= 0.1  # trained on half toxic continuations
    assert b["mean_reward"] < o["mean_reward"] and b["max_bad"] > o["max_bad"]
    assert b["forget_ce"] < 1.5 < 3.0 < o["forget_ce"]  # the oracle never saw an insult
    assert b["retain_acc"] > 0.7 and o["retain_acc"] > 0.7
    assert b["fluency_ppl"] < 200 and 0 < b["distinct_2"] <= 1
    assert task.quality_gate(b, "all") == [] and task.quality_gate(o, "retain") == []
    assert task.quality_gate(o, "all") == [f"forget_rate {o['forget_rate']:.3f} < 0.2"]
    quick = task.evaluate(base, tok, quick=True)
    assert {"forget_rate", "mean_reward", "retain_acc"} <= set(quick) and "fluency_ppl" not in quick
    assert task.evaluate(base, tok) == b  # seeded sampling: the same numbers again


def test_fluency_judge_prefers_the_task_language_to_noise(base_and_oracle):
    task = base_and_oracle[0]
    fluent = [ex.completion for ex in task.eval_examples["retain"]]
    assert task.fluency_ppl(fluent) * 10 < task.fluency_ppl(["zorp klee vash " * 3] * len(fluent))
