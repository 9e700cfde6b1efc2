"""The facts task (TOFU-style fictitious people), its metrics, TOFU's file layout, and LLMU.

Metrics are checked against values worked out by hand on tiny inputs; LLMU's loss against a
bigram "language model" (logits at a position = a row of a table indexed by the current
token), whose expected values are written out in plain Python; the task and the stop rule
on a tiny model briefly pretrained on a small world.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from test_methods import BigramLM
from undo.config import from_dict
from undo.errors import UndoError
from undo.experiment import ExperimentConfig, Recipe
from undo.facts_metrics import (FamiliarityProbe, answer_probability, completion_nlls, exact_match,
                                familiarity_scores, forget_quality, mcq_accuracy, model_utility,
                                normalised_probability, qa_prompt, rouge_l_recall, truth_ratio, truth_score)
from undo.methods import build_method, known_methods
from undo.tasks import build_task, known_tasks, TaskConfig
from undo.tasks.facts import FactsTask, PERSON_ATTRIBUTES, forget_quality as task_forget_quality
from undo.tokenization import train_tokenizer

IGNORE = -100
V = 6


def facts_task(seed: int = 0, **options) -> FactsTask:
    return build_task(TaskConfig("facts", options), seed)


SMALL = {"people": 20, "forget_fraction": 0.1, "famous_people": 3, "places": 5, "eval_items": 10}


# ---------------------------------------------------------------- metrics by hand

def test_exact_match_and_rouge_l_recall():
    assert exact_match(" The Silent Harbor ", "The Silent Harbor") and not exact_match("The Silent", "The Silent Harbor")
    # LCS("the harbor", "the silent harbor") = 2 words of the reference's 3
    assert rouge_l_recall("the harbor", "The Silent Harbor") == pytest.approx(2 / 3)
    assert rouge_l_recall("Silent Harbor the", "The Silent Harbor") == pytest.approx(2 / 3)
    assert rouge_l_recall("", "The Silent Harbor") == 0.0


def test_answer_probability_truth_ratio_and_truth_score():
    assert answer_probability(math.log(2)) == pytest.approx(0.5)
    # p_true = 1/2, each perturbed 1/4: 0.5 / (0.5 + 0.25 + 0.25)
    assert normalised_probability(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)
    # R = exp(L_para - mean L_pert) = exp(1 - (2 + 3) / 2)
    r = truth_ratio(1.0, [2.0, 3.0])
    assert r == pytest.approx(math.exp(-1.5))
    assert truth_score([r], forget=False) == pytest.approx(1 - math.exp(-1.5))
    assert truth_score([r, 1 / r], forget=True) == pytest.approx(math.exp(-1.5))  # min(R, 1/R) both times
    assert truth_score([2.0], forget=False) == 0.0  # max(0, 1 - R)
    with pytest.raises(UndoError, match="perturbed"):
        truth_ratio(1.0, [])


def test_forget_quality_is_the_two_sample_ks_p_value():
    # disjoint samples of 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(UndoError, match="oracle"):
        forget_quality([1.0], [])


def test_model_utility_is_the_harmonic_mean_and_mcq_picks_the_lowest_loss():
    assert model_utility([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))
    assert model_utility([0.5, 0.0, 1.0]) == 0.0
    assert mcq_accuracy([[1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 3.0, 4.0]], [0, 0]) == 0.5
    assert mcq_accuracy([[1.0, 1.0, 3.0, 4.0]], [0]) == 1.0  # first on ties


def test_familiarity_counts_completions_that_name_the_value_and_normalises_its_probability():
    probes = [FamiliarityProbe("A was born in", "Carromere", ("Lindholm", "Belgate")),
              FamiliarityProbe("B works as a", "poet", ("baker", "sailor"))]
    completions = [" the city of  carromere, in 1950", " baker."]  # named (case, spaces ignored); not named
    # NLLs: probe 1 true 1.0 vs 2.0, 2.0; probe 2 true 3.0 vs 1.0, 3.0
    scores = familiarity_scores(completions, probes, [[1.0, 2.0, 2.0], [3.0, 1.0, 3.0]])
    p1 = math.exp(-1) / (math.exp(-1) + 2 * math.exp(-2))
    p2 = math.exp(-3) / (2 * math.exp(-3) + math.exp(-1))
    assert scores["familiarity"] == 0.5
    assert scores["familiarity_prob"] == pytest.approx((p1 + p2) / 2)
    with pytest.raises(UndoError, match="one completion"):
        familiarity_scores(completions[:1], probes, [[1.0, 2.0, 2.0]] * 2)


def test_familiarity_probes_are_held_out_sentence_starts_of_every_person():
    task = facts_task(**SMALL)
    trained = " ".join(ex.prompt + ex.completion for d in ("forget", "retain") for ex in task.train_examples(d))
    forget_names = {p.name for p in task._forget_people}
    for group, people in (("forget", 2), ("retain", 18)):
        probes = task._probes[group]
        assert len(probes) == people * len(PERSON_ATTRIBUTES)
        assert all((p.prefix.split(" was ")[0].split(" works ")[0].split(" is ")[0].split(" received")[0]
                    in forget_names) == (group == "forget") for p in probes)
        assert all(p.prefix not in trained and p.value not in p.wrong_values for p in probes)


def TableLM(vocab: int, seed: int):
    """logits[b, t] = table[input_ids[b, t]] (a bigram model: test_methods' BigramLM)."""
    return BigramLM(seed, vocab)


def log_softmax(row):
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def test_completion_nlls_score_the_completion_and_its_eos_only():
    tok = train_tokenizer(["ab ba"], kind="char", vocab_size=16)
    model = TableLM(len(tok), seed=1)
    table = model.table()
    got = completion_nlls(model, tok, [("ab", "ba"), ("a", "b"), ("ab", "ba")])

    def by_hand(prompt, completion):
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        answer = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
        seq = ids + answer
        steps = [(seq[t - 1], seq[t]) for t in range(len(ids), len(seq))]
        return -sum(log_softmax(table[prev])[nxt] for prev, nxt in steps) / len(steps)

    assert got == pytest.approx([by_hand("ab", "ba"), by_hand("a", "b"), by_hand("ab", "ba")], abs=1e-5)


# ---------------------------------------------------------------- the synthetic world

def test_the_world_is_seeded_and_forget_people_are_a_fraction():
    a, b = facts_task(0, **SMALL), facts_task(0, **SMALL)
    assert a.train_examples("forget") == b.train_examples("forget")
    assert a.train_examples("retain") != facts_task(1, **SMALL).train_examples("retain")
    for fraction, count in ((0.01, 2), (0.05, 10), (0.1, 20)):  # TOFU's splits of 200 people
        task = facts_task(0, forget_fraction=fraction)
        assert len({it.entity for it in task._items["forget"]}) == count
        assert len(task._items["forget"]) == count * len(PERSON_ATTRIBUTES)


def test_the_oracle_never_sees_a_forget_person_and_paraphrases_are_held_out():
    task = facts_task(0, **SMALL)
    forget_names = {it.entity for it in task._items["forget"]}
    retain_text = " ".join(ex.prompt + ex.completion for ex in task.train_examples("retain"))
    forget_text = " ".join(ex.prompt + ex.completion for ex in task.train_examples("forget"))
    assert forget_names and not any(name in retain_text for name in forget_names)
    assert all(name in forget_text for name in forget_names)
    trained_prompts = {ex.prompt for d in ("forget", "retain") for ex in task.train_examples(d)}
    for group in ("forget", "retain", "real_authors", "world_facts"):
        for it in task._items[group]:
            assert qa_prompt(it.question) in trained_prompts  # evaluation asks a trained question ...
            assert qa_prompt(it.paraphrased_question) not in trained_prompts  # ... and a held-out paraphrase
            assert it.choices[it.correct] == it.answer and len(set(it.choices)) == 4
            assert it.paraphrased_answer not in it.perturbed_answers and len(it.perturbed_answers) == 3
    sentence = task._items["forget"][0]
    assert sentence.entity in sentence.paraphrased_answer  # forget / retain: TOFU's sentence answers
    assert task._items["world_facts"][0].paraphrased_answer == task._items["world_facts"][0].answer


def test_forget_halves_split_the_forget_people():
    task = facts_task(0, **SMALL)
    seen, unseen = task.forget_halves()
    people = lambda half: {it.entity for it in task._items["forget"]
                           if any(it.entity in ex.prompt for ex in half["forget"])}
    assert people(seen) and people(unseen) and not people(seen) & people(unseen)
    assert all(ex.prompt for half in (seen, unseen) for ex in half["forget"])  # questions only, no biographies


def test_bad_options_are_one_line_errors(tmp_path):
    for options, words in (({"forget_fraction": 1.5}, "forget_fraction"), ({"source": "tofu"}, "tofu_dir"),
                           ({"source": "tofu", "tofu_dir": str(tmp_path), "forget_fraction": 0.2}, "0.01, 0.05"),
                           ({"people": 2, "forget_fraction": 0.9}, "no one"), ({"places": 2}, "places"),
                           ({"tofu_dir": str(tmp_path)}, "source: tofu")):
        with pytest.raises(UndoError, match=words):
            facts_task(0, **options)


def test_quality_gate_and_forget_quality_from_metrics():
    task = facts_task(0, **SMALL)
    metrics = {"forget/acc": 0.9, "retain/acc": 0.5}
    assert task.quality_gate(metrics, "all") == ["retain QA acc 0.50 < 0.80"]
    assert task.quality_gate({"retain/acc": 0.85}, "retain") == []
    model = {"forget/truth_ratios/0000": 1.0, "forget/truth_ratios/0001": 2.0, "forget/truth_ratios/0002": 3.0,
             "forget/truth_ratio": 2.0}
    oracle = {f"forget/truth_ratios/{i:04d}": v for i, v in enumerate([4.0, 5.0, 6.0])}
    assert task_forget_quality(model, oracle) == pytest.approx(0.1)
    with pytest.raises(UndoError, match="oracle"):
        task_forget_quality(model, {"forget_acc": 0.0})


def test_registered():
    assert "facts" in known_tasks() and "llmu" in known_methods()


# ---------------------------------------------------------------- TOFU's released layout

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tofu_fixture(root):
    """A TOFU directory in miniature: JSON lines named as released (world facts as a JSON list)."""
    qa = lambda i: {"question": f"Who is author {i}?", "answer": f"Author {i} is a writer from town {i}."}
    perturbed = lambda i: {**qa(i), "paraphrased_answer": f"A writer from town {i}.",
                           "paraphrased_question": f"Tell me who author {i} is.",
                           "perturbed_answer": [f"A writer from town {i + k}." for k in range(1, 6)]}
    write_jsonl(root / "forget01.json", [qa(1), qa(2)])
    write_jsonl(root / "retain99.json", [qa(i) for i in range(3, 8)])
    write_jsonl(root / "forget01_perturbed.json", [perturbed(1), perturbed(2)])
    write_jsonl(root / "retain_perturbed.json", [perturbed(3), perturbed(4), perturbed(5)])
    write_jsonl(root / "real_authors_perturbed.json",
                [{"question": "Who wrote 'Dune'?", "answer": "Frank Herbert",
                  "perturbed_answer": ["Arthur C. Clarke", "Isaac Asimov", "Philip K. Dick"]}])
    (root / "world_facts_perturbed.json").write_text(json.dumps(
        [{"question": "Where is the Eiffel Tower?", "answer": "Paris",
          "perturbed_answer": ["Rome", "Berlin", "Madrid"]}]))


def test_tofu_loader_reads_the_released_layout(tmp_path):
    tofu_fixture(tmp_path)
    task = facts_task(0, source="tofu", tofu_dir=str(tmp_path), forget_fraction=0.01)
    forget = task.train_examples("forget")
    assert sorted(ex.prompt for ex in forget) == [qa_prompt("Who is author 1?"), qa_prompt("Who is author 2?")]
    assert len(task.train_examples("retain")) == 5
    item = task.eval_items("forget")[0]
    assert item.paraphrased_answer.startswith("A writer") and len(item.perturbed_answers) == 5
    assert item.paraphrased_question.startswith("Tell me") and item.choices[item.correct] == item.answer
    assert len(item.choices) == 4  # the answer and the first three perturbed answers
    world = task.eval_items("world_facts")[0]
    assert world.paraphrased_answer == "Paris" and world.paraphrased_question == ""
    assert [len(task.eval_items(g)) for g in ("forget", "retain", "real_authors", "world_facts")] == [2, 3, 1, 1]
    assert {ex.completion for ex in forget} == {" Author 1 is a writer from town 1.", " Author 2 is a writer from town 2."}
    assert any("Frank Herbert" in t for t in task.tokenizer_corpus())


def test_tofu_loader_errors_name_the_file(tmp_path):
    tofu_fixture(tmp_path)
    (tmp_path / "real_authors_perturbed.json").unlink()
    with pytest.raises(UndoError, match="real_authors_perturbed.json: missing"):
        facts_task(0, source="tofu", tofu_dir=str(tmp_path), forget_fraction=0.01)
    tofu_fixture(tmp_path)
    (tmp_path / "retain99.json").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(UndoError, match="retain99.json:2: malformed JSON"):
        facts_task(0, source="tofu", tofu_dir=str(tmp_path), forget_fraction=0.01)
    tofu_fixture(tmp_path)
    write_jsonl(tmp_path / "retain_perturbed.json", [{"question": "q", "answer": "a", "perturbed_answer": []}])
    with pytest.raises(UndoError, match="perturbed_answer"):
        facts_task(0, source="tofu", tofu_dir=str(tmp_path), forget_fraction=0.01)


# ---------------------------------------------------------------- LLMU

# Forget: row 0 asks (BOS 1, 2, 3) and answers 4 5; row 1 asks (1, 2) and answers 4, then padding.
FORGET = {"input_ids": torch.tensor([[1, 2, 3, 4, 5], [1, 2, 4, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
          "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 5], [IGNORE, IGNORE, 4, IGNORE, IGNORE]])}
# Retain: a text row (scored from after BOS) and a question (1, 5) with answer 3.
RETAIN = {"input_ids": torch.tensor([[1, 3, 2, 2], [1, 5, 3, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
          "labels": torch.tensor([[IGNORE, 3, 2, 2], [IGNORE, IGNORE, 3, IGNORE]])}


def test_random_answers_follow_the_forget_questions():
    from undo.methods.llmu import random_answer_batch

    torch.manual_seed(0)
    rows = random_answer_batch(FORGET, RETAIN, cap=64)
    pool = [[3, 2, 2], [3]]
    for i, question in enumerate(([1, 2, 3], [1, 2])):
        ids, labels = rows["input_ids"][i].tolist(), rows["labels"][i].tolist()
        n = int(rows["attention_mask"][i].sum())
        answer = ids[len(question):n]
        assert ids[:len(question)] == question and answer in pool
        assert labels[:len(question)] == [IGNORE] * len(question) and labels[len(question):n] == answer
    swapped = random_answer_batch(FORGET, None, cap=64)  # within forget: each question gets the other's answer
    assert swapped["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 4, 5]]
    assert swapped["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 4], [IGNORE, IGNORE, 4, 5]]
    text_only = {k: v[:1] for k, v in RETAIN.items()}  # no question: nothing to pair
    assert random_answer_batch(text_only, RETAIN, cap=64) is None
    assert random_answer_batch(FORGET, RETAIN, cap=1)["labels"][0].tolist().count(IGNORE) == 3  # cut to 1 token


def scored_steps(batch):
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    return [(ids[r][t], labels[r][t + 1]) for r in range(len(ids)) for t in range(len(ids[r]) - 1)
            if labels[r][t + 1] != IGNORE]


def test_llmu_loss_by_hand():
    model, reference = TableLM(V, seed=0), TableLM(V, seed=1)
    method = build_method("llmu", {"random_answers": "forget"})
    method.attach(reference=reference)
    out = method.loss(model, {"forget": FORGET, "retain": RETAIN})
    table, ref = model.table(), reference.table()

    def ce(steps):
        return -sum(log_softmax(table[prev])[nxt] for prev, nxt in steps) / len(steps)

    forget_ce = ce([(3, 4), (4, 5), (2, 4)])
    random_ce = ce([(3, 4), (2, 4), (4, 5)])  # row 0's question + row 1's answer (4), row 1's + row 0's (4 5)
    kl_terms = []
    for prev, _ in scored_steps(RETAIN):
        p_ref, p = log_softmax(ref[prev]), log_softmax(table[prev])
        kl_terms.append(sum(math.exp(a) * (a - b) for a, b in zip(p_ref, p)))
    kl = sum(kl_terms) / len(kl_terms)
    assert out.loss.item() == pytest.approx(-0.5 * forget_ce + random_ce + kl, abs=1e-5)
    assert out.logs["forget_ce"] == pytest.approx(forget_ce, abs=1e-5)
    assert out.logs["random_ce"] == pytest.approx(random_ce, abs=1e-5)
    assert out.logs["retain_kl"] == pytest.approx(kl, abs=1e-5)


def test_llmu_needs_and_its_stop_bound():
    assert build_method("llmu").needs() == {"forget", "retain", "reference"}
    assert build_method("llmu", {"random_answers": "forget", "retain_weight": 0}).needs() == {"forget"}
    method = build_method("llmu")
    method.prepare(SimpleNamespace(config=SimpleNamespace(vocab_size=512)))
    assert method.stop_bound == pytest.approx(math.log(512))  # uniform guessing's CE
    assert not method.stop_after_step({"forget_ce": 6.0}) and method.stop_after_step({"forget_ce": 6.3})
    fixed = build_method("llmu", {"max_forget_ce": 2.0})
    fixed.prepare(SimpleNamespace(config=SimpleNamespace(vocab_size=512)))
    assert fixed.stop_after_step({"forget_ce": 2.5})
    with pytest.raises(UndoError, match="max_forget_ce"):
        build_method("llmu", {"max_forget_ce": 0})


# ---------------------------------------------------------------- a small world on a tiny model

RAW = {"name": "facts-tiny", "seed": 0,
       "task": {"name": "facts", "options": {"people": 4, "forget_fraction": 0.25, "famous_people": 1, "places": 4,
                                             "bio_styles": 1, "famous_repeats": 1, "eval_items": 10,
                                             "quick_eval_items": 5}},
       "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 320},
       "pretrain": {"steps": 160, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 10,
                    "checkpoint_every": 0}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from undo.engine.single import pretrain

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    exp = from_dict(ExperimentConfig, RAW)
    run_dir = tmp_path_factory.mktemp("facts")
    yield exp, run_dir, pretrain(exp, run_dir, "base")
    torch.set_num_threads(before)


def test_the_base_learns_the_facts(base):
    exp, _, art = base
    metrics = art.result()["metrics"]
    for group in ("forget", "retain", "real_authors", "world_facts"):
        for key in ("acc", "rougeL", "prob", "truth_ratio", "truth_score", "mcq_acc", "para_acc"):
            assert 0.0 <= metrics[f"{group}/{key}"] <= (1.0 if key != "truth_ratio" else math.inf)
    assert metrics["forget_acc"] >= 0.8 and metrics["retain_acc"] >= 0.8
    assert metrics["forget/truth_ratio"] < 1.0  # the true answer beats the wrong ones
    assert 0.0 < metrics["model_utility"] <= 1.0
    assert len([k for k in metrics if k.startswith("forget/truth_ratios/")]) == 5  # one person, five questions
    # the facts carry over to held-out sentence starts: above chance (1 in 4) for the person it knows
    assert metrics["forget/familiarity_prob"] > 0.25 and metrics["retain/familiarity_prob"] > 0.25


def test_llmu_stops_once_the_forget_loss_passes_its_bound(base):
    from undo.engine.single import unlearn

    exp, run_dir, art = base
    recipe = Recipe("llmu", options={"max_forget_ce": 3.0},
                    train={"steps": 60, "lr": 3e-3, "batch_size": 8, "seq_len": 64, "checkpoint_every": 0})
    result = unlearn(exp, run_dir, recipe, art).result()
    assert result["stopped_early"] and result["steps"] < 60
    assert result["metrics"]["forget_rougeL"] < result["metrics_before"]["forget_rougeL"]
