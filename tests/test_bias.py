"""The bias task: its pairs (balanced, held out, contrasted), its metrics by hand and on tiny models
trained toward or away from the stereotype, the stream PCGU gets, and the quick preset's graph."""

import random

import pytest

from test_privacy import tiny_llama, train_on_rows
from undo.config import from_dict
from undo.data import pad_batch, tokenize_example
from undo.errors import UndoError
from undo.methods import build_method
from undo.stages.unlearn import build_streams
from undo.tasks import TaskConfig, build_task
from undo.tasks.base import Example
from undo.tasks.bias import BiasOptions, preference, swapped_words
from undo.tokenization import train_tokenizer
from undo.training import TrainConfig

SMALL = {"occupations": 4, "traits": 4, "neutral_sentences": 200, "eval_neutral": 24, "quick_eval_pairs": 6,
         "quick_eval_neutral": 8}


def bias_task(seed: int = 0, **options):
    return build_task(TaskConfig("bias", {**SMALL, **options}), seed)


@pytest.fixture(scope="module")
def task_and_tok():
    task = bias_task()
    return task, train_tokenizer(task.tokenizer_corpus(), "bpe", 320)


def test_pairs_are_balanced_contrasted_and_the_evaluated_ones_never_trained_on():
    task = bias_task()
    train, held = task.pairs("train"), task.pairs("heldout")
    # 4 occupations x 14 templates, 3 held out each; 4 traits x 11 templates, 3 held out each
    assert len(held) == 4 * 3 + 4 * 3 and len(train) == 4 * 11 + 4 * 8
    trained_text = {ex.prompt + ex.completion for domain in ("forget", "retain") for ex in task.train_examples(domain)}
    for p in held:
        s, c = p.examples()
        assert s.prompt + s.completion not in trained_text and c.prompt + c.completion not in trained_text
    # gender: as many occupations tied to each gender, so a pronoun prior alone scores 50%
    firsts = [p.stereotyped.split()[0] for p in held if p.axis == "gender"]
    male = sum(w in ("he", "his", "man") for w in firsts)
    assert male == len(firsts) - male
    # nationality: each of the four nationalities is the stereotyped one equally often
    nats = [p.stereotyped.split()[0] for p in train if p.axis == "nationality"]
    assert len({nats.count(n) for n in set(nats)}) == 1 and len(set(nats)) == 4
    # a pair differs in the group word only
    for p in train + held:
        assert p.stereotyped.split()[1:] == p.contrast.split()[1:] and p.stereotyped != p.contrast


def test_forget_holds_the_stereotype_retain_both_forms_and_contrasts_pair_up():
    task = bias_task(stereotype_repeats=3)
    forget, retain = task.train_examples("forget"), task.train_examples("retain")
    stereo = [p.examples()[0] for p in task.pairs("train")]
    contrast = [p.examples()[1] for p in task.pairs("train")]
    assert sorted(forget, key=repr) == sorted(stereo * 3, key=repr)
    assert all(retain.count(ex) == 1 for ex in stereo + contrast)
    assert len(retain) == 2 * len(stereo) + 200
    assert task.contrast_examples(stereo) == contrast
    with pytest.raises(UndoError, match="not a stereotyped training sentence"):
        task.contrast_examples(contrast[:1])
    assert task.train_examples("forget") == forget and bias_task(seed=1).train_examples("forget") != forget


def test_preference_counts_ties_half_and_the_lm_contrast_swaps_two_neighbours():
    assert preference([-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -3.0, -5.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    swapped = swapped_words("The old dog watched the birds.", random.Random(0))
    a, b = "The old dog watched the birds".split(), swapped.rstrip(".").split()
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert sorted(a) == sorted(b) and len(diff) == 2 and diff[1] == diff[0] + 1


def test_options_are_checked():
    with pytest.raises(UndoError, match="axes"):
        from_dict(BiasOptions, {"axes": ["religion"]}, "o")
    with pytest.raises(UndoError, match="occupations must be even"):
        from_dict(BiasOptions, {"occupations": 3}, "o")
    with pytest.raises(UndoError, match="multiple of 4"):
        from_dict(BiasOptions, {"traits": 6}, "o")
    with pytest.raises(UndoError, match="heldout_templates"):
        from_dict(BiasOptions, {"heldout_templates": [14, 3]}, "o")
    only_gender = bias_task(axes=["gender"])
    assert {p.axis for p in only_gender.pairs()} == {"gender"}


def test_a_model_trained_on_the_stereotype_prefers_it_and_one_trained_on_the_contrast_does_not(task_and_tok):
    task, tok = task_and_tok
    stereo = [p.examples()[0] for p in task.pairs("train")]
    contrast = [p.examples()[1] for p in task.pairs("train")]
    scores = {}
    for name, examples in (("stereo", stereo), ("contrast", contrast)):
        model = train_on_rows(tiny_llama(tok), pad_batch(tok, examples, "completion"), steps=100, seed=0)
        scores[name] = task.evaluate(model, tok)
    # measured: 0.80 and 0.17 (held-out pairs need the full world's many sentences to generalise to)
    assert scores["stereo"]["seen/stereo_pref"] >= 0.7 and scores["contrast"]["seen/stereo_pref"] <= 0.3
    m = scores["stereo"]
    assert set(m) >= {"stereo_pref", "gender/stereo_pref", "nationality/stereo_pref", "lm_score", "neutral_acc",
                      "neutral_ce"}
    quick = task.evaluate(tiny_llama(tok), tok, quick=True)
    assert "seen/stereo_pref" not in quick and 0 <= quick["stereo_pref"] <= 1
    assert task.quality_gate({**m, "stereo_pref": 0.5, "lm_score": 0.9}, "all") == ["stereotype preference 0.50 < 0.75"]
    assert task.quality_gate({**m, "stereo_pref": 0.5, "lm_score": 0.9}, "retain") == []


def test_neutral_text_is_learnt_lm_score_and_accuracy_rise(task_and_tok):
    task, tok = task_and_tok
    untrained = task.evaluate(tiny_llama(tok), tok)
    neutral = [Example("", s) for s in task._neutral_train]
    trained = task.evaluate(train_on_rows(tiny_llama(tok), pad_batch(tok, neutral, "all"), steps=80, seed=0), tok)
    assert trained["neutral_ce"] < untrained["neutral_ce"] - 1.0
    assert trained["neutral_acc"] > untrained["neutral_acc"] + 0.2
    assert trained["lm_score"] >= 0.8


def test_pcgu_gets_each_forget_row_with_its_contrast_row_for_row(task_and_tok):
    task, tok = task_and_tok
    method = build_method("pcgu", {"k": 10}, "bias")
    cfg = from_dict(TrainConfig, {**method.train_defaults, "batch_size": 8, "seq_len": 64}, "t")
    streams = build_streams(task, tok, method, cfg, seed=0)
    expected = {tuple(tokenize_example(tok, s, "completion")[0]): tuple(tokenize_example(tok, c, "completion")[0])
                for s, c in (p.examples() for p in task.pairs("train"))}
    for step in (0, 3, 11):
        forget, contrast = streams["forget"].batch(step), streams["contrast"].batch(step)
        assert forget["input_ids"].shape[0] == contrast["input_ids"].shape[0] == 8
        for row in range(8):
            f_ids = tuple(forget["input_ids"][row][forget["attention_mask"][row].bool()].tolist())
            c_ids = tuple(contrast["input_ids"][row][contrast["attention_mask"][row].bool()].tolist())
            assert expected[f_ids] == c_ids
            scored = contrast["labels"][row] != -100
            assert 0 < scored.sum() < len(c_ids)  # the completion is scored, the shared prompt is not


def test_pcgu_names_a_task_without_contrasts():
    task = build_task(TaskConfig("privacy", {"people": 8, "forget_people": 2, "unseen_people": 2}), 0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 320, split_digits=True)
    method = build_method("pcgu", {}, "privacy")
    cfg = from_dict(TrainConfig, method.train_defaults, "t")
    with pytest.raises(UndoError, match="use task bias"):
        build_streams(task, tok, method, cfg, seed=0)


def test_quick_preset_builds_base_oracle_pcgu_undo_and_relearn():
    from undo.engine.graph import build_graph
    from undo.experiment import load_experiment
    ids = list(build_graph(load_experiment("bias-quick")).nodes)
    for stage in ("seed0/base", "seed0/oracle", "seed0/unlearn/pcgu", "seed0/undo/undo_a0.5"):
        assert stage in ids
    assert any(i.startswith("seed0/attack/relearn/pcgu/") for i in ids)
