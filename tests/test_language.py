"""The language task: synthetic languages, sources, metrics (checked by hand), tokenizer fit."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from undo.config import from_dict
from undo.errors import UndoError
from undo.tasks import TaskConfig, build_task
from undo.tasks.language import LanguageOptions, LanguageTask, korean_particles, text_metrics
from undo.tasks.language_grammar import (
    Clause, NounPhrase, Sentence, hangul_number, has_final_consonant, latin_number, render_hangul, render_latin,
    synthetic_languages,
)
from undo.tokenization import encode, train_tokenizer

SMALL = dict(train_documents=60, eval_documents=12, quick_eval_documents=4, eval_seq_len=64, eval_batch_size=4)


def tiny_model(tok, max_positions: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_positions,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config).eval()


def is_hangul_syllable(ch: str) -> bool:
    return 0xAC00 <= ord(ch) <= 0xD7A3


# ---------------------------------------------------------------- synthetic languages


def test_synthetic_is_deterministic_disjoint_and_in_two_scripts():
    a = LanguageTask(LanguageOptions(**SMALL), seed=3)
    b = LanguageTask(LanguageOptions(**SMALL), seed=3)
    c = LanguageTask(LanguageOptions(**SMALL), seed=4)
    for domain in ("retain", "forget"):
        assert a.train_texts(domain) == b.train_texts(domain)
        assert a.eval_texts(domain) == b.eval_texts(domain)
        assert a.train_texts(domain) != c.train_texts(domain)
        assert len(a.eval_texts(domain)) == 12 and len(set(a.eval_texts(domain))) == 12
        assert not set(a.eval_texts(domain)) & set(a.train_texts(domain))  # held-out text is unseen
    retain, forget = " ".join(a.train_texts("retain")), " ".join(a.train_texts("forget"))
    assert retain.isascii() and not any(is_hangul_syllable(ch) for ch in retain)
    letters = [ch for ch in forget if ch not in " ."]
    assert letters and all(is_hangul_syllable(ch) for ch in letters)
    # No shared words: knowing the retain language gives away none of the forget vocabulary.
    words = lambda text: {w.strip(".").lower() for w in text.split()}
    assert not words(retain) & words(forget)
    # A different seed draws a different lexicon, not just different sentences.
    assert words(retain) != words(" ".join(c.train_texts("retain")))


def test_train_examples_are_plain_text_scored_everywhere():
    task = LanguageTask(LanguageOptions(**SMALL), seed=0)
    examples = task.train_examples("forget")
    assert [ex.completion for ex in examples] == task.train_texts("forget")
    assert all(ex.prompt == "" for ex in examples)
    assert task.loss_on() == "all"
    assert task.tokenizer_corpus() == task.train_texts("retain") + task.train_texts("forget")
    assert (task.forget_metric, task.retain_metric, task.higher_is_better) == ("forget_ce", "retain_ce", False)


def test_rendering_follows_each_grammar():
    langs = synthetic_languages(0)
    c, lat, han = langs.concepts, langs.latin, langs.hangul
    person = c.noun_class.index("person")
    thing = c.noun_class.index("thing")
    place = c.noun_class.index("place")
    verb = 1  # verbs 1, 2 take animate subjects; their frames do not matter for rendering
    meaning = [Sentence("past", True, (Clause(NounPhrase(person, 3, None, False), verb,
                                              NounPhrase(thing, 1, None, True), NounPhrase(place, 1, None, False)),))]
    f = lat.function
    three = lat.digits[3]
    time_word = lat.time_words["past"]
    expected = (f"{time_word[0].upper()}{time_word[1:]} {three} {lat.nouns[person]}{f['plural_animate']} "
                f"{lat.verbs[verb]}{f['past']}{f['plural_verb']} {f['definite']} {lat.nouns[thing]} "
                f"{f['at']} {f['indefinite']} {lat.nouns[place]}.")
    assert render_latin(c, lat, meaning) == expected

    # SOV: subject (plural marker, number + counter, subject particle), place + 에서, object with
    # 그 (mentioned before) and object particle, verb + honorific (person subject) + past + 다.
    counter = han.digits[3] + "명"
    subject_particle = "이" if (ord("명") - 0xAC00) % 28 else "가"
    noun_o = han.nouns[thing]
    object_particle = "을" if (ord(noun_o[-1]) - 0xAC00) % 28 else "를"
    expected_ko = (f"{han.time_words['past']} {han.nouns[person]}들 {counter}{subject_particle} "
                   f"{han.nouns[place]}에서 그 {noun_o}{object_particle} {han.verbs[verb]}시었다.")
    assert render_hangul(c, han, meaning) == expected_ko

    # Two clauses: Latin joins with its 'and'; Hangul chains the first verb with -고 (no tense).
    animal = c.noun_class.index("animal")
    clause = Clause(NounPhrase(animal, 1, None, False), verb, NounPhrase(thing, 1, None, False), None)
    two = [Sentence("future", False, (clause, clause))]
    latin_two = render_latin(c, lat, two)
    assert f" {f['and']} " in latin_two and latin_two.count(lat.verbs[verb] + f["future"]) == 2
    korean_two = render_hangul(c, han, two)
    assert korean_two.count(han.verbs[verb] + "고 ") == 1 and korean_two.endswith(han.verbs[verb] + "겠다.")


def test_number_words_are_compositional():
    langs = synthetic_languages(0)
    lat, han = langs.latin, langs.hangul
    assert latin_number(lat, 7) == lat.digits[7]
    assert latin_number(lat, 10) == lat.ten
    assert latin_number(lat, 23) == f"{lat.digits[2]}{lat.ten} {lat.digits[3]}"
    assert hangul_number(han, 10) == han.ten
    assert hangul_number(han, 11) == han.ten + han.digits[1]
    assert hangul_number(han, 40) == han.digits[4] + han.ten


def test_korean_particles_follow_the_final_consonant_everywhere():
    task = LanguageTask(LanguageOptions(**SMALL), seed=1)
    checked = 0
    for doc in task.train_texts("forget"):
        for word in doc.replace(".", "").split():
            if len(word) < 2 or word[-1] not in "이가을를":
                continue
            before_consonant = has_final_consonant(word[-2])
            expected = {"이": True, "가": False, "을": True, "를": False}[word[-1]]
            assert before_consonant == expected, word
            checked += 1
    assert checked > 100


def test_korean_particles_for_bundled_text():
    got = korean_particles({"name": "김철수", "company": "주식회사 한빛", "name2": "이영민", "job": "교사"})
    assert got == {"name_topic": "김철수는", "company_topic": "주식회사 한빛은", "name2_object": "이영민을", "job_as": "교사로"}
    assert korean_particles({"name": "박민", "company": "마루", "name2": "하늘", "job": "경찰관"})["job_as"] == "경찰관으로"
    assert korean_particles({"name": "박민", "company": "마루", "name2": "하늘", "job": "기술직"})["job_as"] == "기술직으로"
    assert korean_particles({"name": "박민", "company": "마루", "name2": "하늘", "job": "철도원 및 사이클"})["job_as"].endswith("사이클로")


# ---------------------------------------------------------------- options and sources


def test_options_are_validated():
    with pytest.raises(UndoError, match=r"retain_files: source 'files' needs at least one file"):
        from_dict(LanguageOptions, {"source": "files"}, "task.options")
    with pytest.raises(UndoError, match=r"forget_files is only read with source: files"):
        from_dict(LanguageOptions, {"forget_files": ["ko.txt"]}, "task.options")
    with pytest.raises(UndoError, match=r"eval_documents must be at least 1"):
        from_dict(LanguageOptions, {"eval_documents": 0}, "task.options")
    with pytest.raises(UndoError, match=r"'web' is not allowed"):
        from_dict(LanguageOptions, {"source": "web"}, "task.options")
    task = build_task(TaskConfig(name="language", options=dict(SMALL)), seed=0)
    assert isinstance(task, LanguageTask)


def test_files_source_holds_out_evaluation_documents(tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("\n".join(f"english document number {i}" for i in range(20)) + "\n", encoding="utf-8")
    ko = tmp_path / "ko.jsonl"
    ko.write_text("".join(json.dumps({"body": f"한국어 문서 {i}"}, ensure_ascii=False) + "\n" for i in range(20)),
                  encoding="utf-8")
    opts = dict(source="files", retain_files=[str(en)], forget_files=[str(ko)], text_field="body",
                train_documents=10, eval_documents=5)
    # The retain .txt ignores text_field; the forget .jsonl uses it.
    task = LanguageTask(from_dict(LanguageOptions, opts, "task.options"), seed=0)
    for domain in ("retain", "forget"):
        train, held = task.train_texts(domain), task.eval_texts(domain)
        assert len(train) == 10 and len(held) == 5 and not set(train) & set(held)
    assert all("한국어" in t for t in task.train_texts("forget"))
    again = LanguageTask(from_dict(LanguageOptions, opts, "task.options"), seed=0)
    assert again.eval_texts("forget") == task.eval_texts("forget")
    other_seed = LanguageTask(from_dict(LanguageOptions, opts, "task.options"), seed=1)
    assert other_seed.eval_texts("forget") != task.eval_texts("forget")

    # Separate evaluation files; training duplicates of evaluation text are dropped.
    ko_eval = tmp_path / "ko_eval.txt"
    ko_eval.write_text("한국어 문서 3\n평가 문서\n", encoding="utf-8")
    opts2 = dict(opts, forget_eval_files=[str(ko_eval)], text_field="body")
    task2 = LanguageTask(from_dict(LanguageOptions, opts2, "task.options"), seed=0)
    assert task2.eval_texts("forget") == ["한국어 문서 3", "평가 문서"]
    assert "한국어 문서 3" not in task2.train_texts("forget") and len(task2.train_texts("forget")) == 9


def test_files_source_errors_name_the_file(tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("a\nb\nc\n", encoding="utf-8")
    bad = tmp_path / "ko.jsonl"
    bad.write_text('{"text": "가"}\n{"txt": "나"}\n', encoding="utf-8")
    opts = LanguageOptions(source="files", retain_files=[str(en)], forget_files=[str(bad)])
    with pytest.raises(UndoError, match=r"ko\.jsonl:2: no field 'text'"):
        LanguageTask(opts, seed=0)
    one = tmp_path / "one.txt"
    one.write_text("only one document\n", encoding="utf-8")
    with pytest.raises(UndoError, match=r"one\.txt: 1 document\(s\) of forget text; need at least 2"):
        LanguageTask(LanguageOptions(source="files", retain_files=[str(en)], forget_files=[str(one)]), seed=0)


@pytest.mark.parametrize("empty_option", ["retain_files", "forget_files", "forget_eval_files"])
def test_a_files_source_with_no_rows_stops_at_task_build(tmp_path, empty_option):
    """An empty split (a file with no text) fails when the task is built, before any stage trains."""
    texts = tmp_path / "text.txt"
    texts.write_text("a b\nc d\ne f\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    options = {"source": "files", "retain_files": [str(texts)], "forget_files": [str(texts)], empty_option: [str(empty)]}
    with pytest.raises(UndoError, match=r"empty\.txt: no documents in it \(empty, or only blank text\); give a file with text"):
        build_task(TaskConfig("language", options), 0)


def test_bundled_source_without_faker_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faker", None)  # import faker now fails as if not installed
    with pytest.raises(UndoError, match=r"needs the faker package.*undo\[text\]"):
        LanguageTask(LanguageOptions(source="bundled", **SMALL), seed=0)


def test_bundled_source_gives_english_and_korean():
    pytest.importorskip("faker", reason="the bundled source needs the optional faker package (undo[text])")
    task = LanguageTask(LanguageOptions(source="bundled", **SMALL), seed=0)
    again = LanguageTask(LanguageOptions(source="bundled", **SMALL), seed=0)
    assert task.train_texts("forget") == again.train_texts("forget")
    english, korean = " ".join(task.train_texts("retain")), " ".join(task.train_texts("forget"))
    assert not any(is_hangul_syllable(ch) for ch in english) and " works at " in english or " lives at " in english
    hangul = sum(is_hangul_syllable(ch) for ch in korean)
    assert hangul > 0.5 * sum(ch.isalpha() for ch in korean)
    for domain in ("retain", "forget"):
        assert not set(task.eval_texts(domain)) & set(task.train_texts(domain))


# ---------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_round_trips_korean_and_english():
    task = LanguageTask(LanguageOptions(**SMALL), seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=400)
    samples = task.eval_texts("retain")[:3] + task.eval_texts("forget")[:3] + [
        "The quick brown fox, 12 times.  다람쥐 헌 쳇바퀴에 타고파! Mixed 한국어 and English.",
    ]
    for text in samples:
        ids = encode(tok, text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Merges were learned for both scripts: fewer tokens than UTF-8 bytes in each language.
    for domain in ("retain", "forget"):
        text = task.eval_texts(domain)[0]
        assert len(encode(tok, text)) < 0.8 * len(text.encode("utf-8"))


def test_char_tokenizer_that_cannot_encode_evaluation_text_is_an_error(tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("abc\nabd\nabe\n", encoding="utf-8")
    en_eval = tmp_path / "en_eval.txt"
    en_eval.write_text("abc abe\n", encoding="utf-8")
    ko = tmp_path / "ko.txt"
    ko.write_text("가나\n가다\n나다\n", encoding="utf-8")
    opts = LanguageOptions(source="files", retain_files=[str(en)], forget_files=[str(ko)],
                           retain_eval_files=[str(en_eval)], eval_seq_len=16)
    task = LanguageTask(opts, seed=0)
    tok = train_tokenizer(["abc abd"] + task.train_texts("forget"), kind="char")  # no 'e'
    with pytest.raises(UndoError, match=r"retain evaluation text: the tokenizer cannot encode 'e'"):
        task.evaluate(tiny_model(tok), tok)


def test_eval_rows_longer_than_the_model_is_an_error():
    task = LanguageTask(LanguageOptions(**dict(SMALL, eval_seq_len=64)), seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=300)
    with pytest.raises(UndoError, match=r"eval_seq_len = 64 is longer than the model's max_position_embeddings \(32\)"):
        task.evaluate(tiny_model(tok, max_positions=32), tok)


# ---------------------------------------------------------------- metrics


def hand_scores(model, rows_of_ids, bos_id):
    """CE and top-1 accuracy written out: each row run alone, unpadded, scoring every
    position after the first whose token is not BOS."""
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for ids in rows_of_ids:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            logp = F.log_softmax(logits.double(), dim=-1)
            for t in range(1, len(ids)):
                if ids[t] == bos_id:
                    continue
                total += -logp[t - 1, ids[t]].item()
                correct += int(logits[t - 1].argmax().item() == ids[t])
                count += 1
    return total / count, correct / count


def test_text_metrics_match_a_hand_computation_with_packing_and_padding():
    tok = train_tokenizer(["one two three four five six", "가나다 라마 바사"], "bpe", vocab_size=300)
    texts = ["one two three", "가나다 라마", "four five six six"]
    seqs = [[tok.bos_token_id] + encode(tok, t) + [tok.eos_token_id] for t in texts]
    # Rows of exactly docs 0+1: the packer puts them together and doc 2 alone, padded.
    seq_len = len(seqs[0]) + len(seqs[1])
    assert len(seqs[2]) < seq_len
    model = tiny_model(tok)
    got = text_metrics(model, tok, texts, seq_len=seq_len, batch_size=1)
    ce, acc = hand_scores(model, [seqs[0] + seqs[1], seqs[2]], tok.bos_token_id)
    assert got["ce"] == pytest.approx(ce, rel=1e-5)
    assert got["acc"] == pytest.approx(acc)
    assert got["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    # Batching rows together (with right padding) gives the same numbers.
    batched = text_metrics(model, tok, texts, seq_len=seq_len, batch_size=8)
    assert batched["ce"] == pytest.approx(ce, rel=1e-5) and batched["acc"] == pytest.approx(acc)


def test_evaluate_reports_both_languages_and_quick_uses_a_subset():
    task = LanguageTask(LanguageOptions(**SMALL), seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=300)
    model = tiny_model(tok)
    full = task.evaluate(model, tok)
    assert set(full) == {f"{d}_{m}" for d in ("forget", "retain") for m in ("ce", "ppl", "acc")}
    for domain in ("forget", "retain"):
        direct = text_metrics(model, tok, task.eval_texts(domain), 64, 4)
        assert full[f"{domain}_ce"] == pytest.approx(direct["ce"])
        quick_direct = text_metrics(model, tok, task.eval_texts(domain)[:4], 64, 4)
        assert task.evaluate(model, tok, quick=True)[f"{domain}_ce"] == pytest.approx(quick_direct["ce"])
        assert 0.0 <= full[f"{domain}_acc"] <= 1.0
    assert model.training is False


def test_evaluation_text_is_tokenized_once_per_tokenizer(monkeypatch):
    """Quick evaluations every eval_every steps reuse the packed rows: same numbers, no re-tokenizing."""
    import undo.tasks.language as language

    task = LanguageTask(LanguageOptions(**SMALL), seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=300)
    model = tiny_model(tok)
    calls = []
    real_pack = language.pack
    monkeypatch.setattr(language, "pack", lambda *a, **k: calls.append(1) or real_pack(*a, **k))
    first = [task.evaluate(model, tok, quick=True) for _ in range(3)]
    assert len(calls) == 2  # forget and retain, once each
    assert first[0] == first[1] == first[2]
    task.evaluate(model, tok)
    assert len(calls) == 4  # the full set is other text
    other = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=300)  # an equal but distinct tokenizer
    assert task.evaluate(model, other, quick=True) == first[0]
    assert len(calls) == 6


def test_training_on_one_language_lowers_its_cross_entropy_more():
    """An 'oracle' trained on the retain language only learns it, not the forget one."""
    from undo.data import BatchStream, pack_examples
    from undo.training import TrainConfig, lm_loss, train

    task = LanguageTask(LanguageOptions(**dict(SMALL, train_documents=80)), seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=300)
    model = tiny_model(tok, seed=1)
    before = task.evaluate(model, tok)
    rows = pack_examples(tok, task.train_examples("retain"), 64, "all")
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=0, checkpoint_every=0)
    train(model, lm_loss, {"retain": BatchStream(rows, 8, seed=0)}, cfg, seed=0, desc="oracle")
    after = task.evaluate(model, tok)
    assert after["retain_ce"] < before["retain_ce"] - 1.0
    assert after["forget_ce"] > after["retain_ce"] + 1.0
    assert after["retain_acc"] > before["retain_acc"]


def test_language_preset_loads_and_validates():
    from undo.experiment import load_experiment

    exp = load_experiment("language")
    assert exp.task.name == "language" and exp.model.preset == "tiny" and exp.tokenizer.kind == "bpe"
    options = from_dict(LanguageOptions, exp.task.options, "task.options")
    assert options.source == "synthetic" and options.eval_seq_len <= exp.model.max_position_embeddings
    assert exp.pretrain.seq_len <= exp.model.max_position_embeddings
