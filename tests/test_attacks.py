"""The relearning attacker's data: what it is drawn from, how much is kept, and its seed."""

import re

import pytest

from undo.attacks.relearn import AttackConfig, Relearn, attack_examples
from undo.config import from_dict
from undo.errors import UndoError
from undo.training import lr_lambda
from undo.tasks.arithmetic import ArithmeticOptions, ArithmeticTask


def task():
    return ArithmeticTask(ArithmeticOptions(examples_per_operation=200, eval_per_format=4), seed=0)


def test_mixed_attack_data_is_a_seeded_sample_of_forget_and_retain():
    t = task()
    forget, retain = set(t.train_examples("forget")), set(t.train_examples("retain"))
    cfg = AttackConfig(data="mixed", retain_fraction=0.25, steps=5, batch_size=16)
    examples = attack_examples(t, cfg, seed=3)
    assert len(examples) == 5 * 16                   # one example per row: only what 5 steps use
    assert examples == attack_examples(t, cfg, seed=3) != attack_examples(t, cfg, seed=4)
    n_forget = sum(ex in forget for ex in examples)
    assert n_forget + sum(ex in retain for ex in examples) == len(examples)
    assert 0.6 < n_forget / len(examples) < 0.9      # 75% forget in the pool
    equations = [re.fullmatch(r"\d+ (\S) \d+ =", ex.prompt) for ex in examples if ex in retain]
    retain_ops = {m.group(1) for m in equations if m}
    assert retain_ops == {"+", "-"}                  # every retain operation, not just the first one


def test_forget_attack_data_is_forget_only_and_capped():
    t = task()
    forget = set(t.train_examples("forget"))
    examples = attack_examples(t, AttackConfig(data="forget", steps=2, batch_size=8), seed=0)
    assert len(examples) == 16 and all(ex in forget for ex in examples)
    everything = attack_examples(t, AttackConfig(data="forget", steps=1000, batch_size=8), seed=0)
    assert sorted(everything, key=repr) == sorted(t.train_examples("forget"), key=repr)


def test_the_attack_trains_at_a_constant_learning_rate_with_no_warmup():
    cfg = AttackConfig(steps=20).train_config(1e-3)
    assert cfg.warmup_steps == 0 and cfg.schedule == "constant" and cfg.lr == 1e-3
    assert [lr_lambda(cfg)(step) for step in range(cfg.steps)] == [1.0] * cfg.steps
    assert Relearn.version == 1  # the warmup step it had scaled step 0 by 1: the same numbers, cache kept


@pytest.mark.parametrize("key, value", [("steps", 0), ("eval_every", 0), ("batch_size", 0), ("seq_len", 1)])
def test_attack_settings_that_cannot_run_are_rejected(key, value):
    with pytest.raises(UndoError, match=rf"attack.{key} must be at least"):
        from_dict(AttackConfig, {key: value}, "attack")


def test_forget_only_evaluation_gives_the_full_evaluations_forget_accuracy(monkeypatch):
    """`evaluate: forget` scores the forget items alone; on arithmetic its forget_acc is the
    full quick evaluation's, per group too (a stand-in decoder answers every third prompt)."""
    import undo.tasks.arithmetic as arithmetic
    from undo.attacks.relearn import evaluation

    task = ArithmeticTask(ArithmeticOptions(examples_per_operation=40, eval_per_format=12, quick_eval_per_format=6), 0)
    answers = {ex.prompt: ex.completion for exs in task.eval_examples().values() for ex in exs}
    calls = []

    def decoder(model, tok, prompts, max_new_tokens):
        calls.append(len(prompts))
        return [answers[p] if i % 3 == 0 else " 0" for i, p in enumerate(prompts)]

    monkeypatch.setattr(arithmetic, "greedy_complete", decoder)
    full = evaluation(task, None, AttackConfig())(None)
    calls_full, calls[:] = list(calls), []
    forget = evaluation(task, None, AttackConfig(evaluate="forget"))(None)
    assert 0 < forget["forget_acc"] < 1 and forget["forget_acc"] == full["forget_acc"]
    for group in ("multiplication/equation", "division/word"):
        assert forget[f"{group}/acc"] == full[f"{group}/acc"]
    assert "retain_acc" not in forget and sum(calls) == sum(calls_full) / 2  # half the decoding
