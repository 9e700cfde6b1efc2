"""The privacy task, its metrics and the two sequence-forgetting methods.

Metrics and losses are checked against values worked out by hand on tiny inputs: lists of
tokens, a bigram "language model" whose logits are a table row per current token, and
a 2-layer Llama with 64 hidden units that memorises a tiny corpus in a few seconds.
"""

from __future__ import annotations

import json
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from undo import privacy_metrics as pm
from undo.config import from_dict
from undo.data import BatchStream, pad_batch
from undo.errors import UndoError
from undo.methods import build_method
from undo.methods.base import NEEDS
from undo.methods.knowledge_unlearning import distinct_rows
from undo.methods.selective_forgetting import least_likely_mask, span_ascent_loss
from undo.metrics import masked_ce
from undo.tasks import TaskConfig, build_task
from undo.tasks.privacy import STYLES, PrivacyOptions, load_muse, parse_record
from undo.tokenization import train_tokenizer
from undo.training import TrainConfig

IGNORE = -100
TINY = dict(people=6, forget_people=2, unseen_people=3, docs_per_person=1, canary_repeats=[1, 8],
            canaries_per_repeat=1, unseen_canaries=2, canary_digits=2, eval_documents=16, quick_eval_documents=3,
            eval_batch_size=16, exposure_samples=50)


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config).eval()


def privacy_task(seed: int = 0, **options):
    return build_task(TaskConfig("privacy", {**TINY, **options}), seed)


def task_tokenizer(task):
    return train_tokenizer(task.tokenizer_corpus(), "bpe", 320, split_digits=True)


# ---------------------------------------------------------------- pure metrics, by hand


def test_span_token_mask_marks_tokens_that_overlap_a_span():
    offsets = [(0, 3), (3, 4), (4, 8), (8, 9), (9, 9)]
    assert pm.span_token_mask(offsets, [(2, 5)]) == [True, True, True, False, False]
    assert pm.span_token_mask(offsets, []) == [False] * 5


def test_ngram_overlap_is_the_share_of_the_true_ngrams_found():
    # truth bigrams (1,2) (2,3) (3,5); generated has (1,2) (2,3): 2 of 3
    assert pm.ngram_overlap([1, 2, 3, 4, 9], [1, 2, 3, 5], 2) == pytest.approx(2 / 3)
    assert pm.ngram_overlap([1, 2, 3, 4, 9], [1, 2, 3, 5], 3) == pytest.approx(1 / 2)
    assert pm.ngram_overlap([], [7, 7], 1) == 0.0
    with pytest.raises(UndoError):
        pm.ngram_overlap([1, 2], [1], 2)


def test_memorization_accuracy_over_positions():
    assert pm.memorization_accuracy([False, True, False, True, True], [1, 2, 3]) == pytest.approx(2 / 3)
    assert math.isnan(pm.memorization_accuracy([True], []))


def test_el_and_s_el_from_continuations_by_hand():
    # ids: BOS 5 6 7 8 9; first scored position 2; tokens 4 and 5 sensitive; n = 2.
    seq = pm.Encoded([0, 5, 6, 7, 8, 9], first=2, sensitive=[False, False, False, False, True, True])
    assert pm.el_positions(seq, 2) == [2, 3, 4] and pm.sensitive_positions(seq) == [4, 5]
    conts = {2: [6, 7, 1, 9], 3: [7, 8, 9], 4: [8, 0], 5: [9]}
    el, sel = pm.extraction_scores(seq, conts, 2)
    # t=2: truth bigrams (6,7) (7,8) (8,9), found (6,7): 1/3; t=3: 2/2; t=4: (8,9) not found: 0
    assert el == pytest.approx((1 / 3 + 1 + 0) / 3)
    # S-EL: t=4 -> 0; t=5 has one token left, so unigrams: (9) found -> 1
    assert sel == pytest.approx(0.5)
    assert pm.continuation_requests(seq, 2, True, None) == {2: 4, 3: 3, 4: 2, 5: 1}
    assert pm.continuation_requests(seq, 2, False, 2) == {2: 2, 3: 2, 4: 2}


def test_a_hit_shares_the_continuation_of_the_next_position():
    # ids: BOS 5 6 7 8; hits at 2 and 3 (the greedy next token is the true one), a miss at 1
    seq = pm.Encoded([0, 5, 6, 7, 8], first=1, sensitive=[False] * 5)
    hit = [False, False, True, True, False]
    needed, generate = pm.shared_continuations(hit, {1: 4, 2: 3})
    assert needed == {1: 4, 2: 3, 3: 2, 4: 1} and generate == {1: 4, 4: 1}
    conts = pm.assemble_continuations(seq, hit, needed, {1: [9, 9, 9, 9], 4: [3]})
    assert conts == {4: [3], 3: [7, 3], 2: [6, 7, 3], 1: [9, 9, 9, 9]}


def test_sensitive_groups_and_extraction_requests():
    seq = pm.Encoded([0, 5, 6, 7, 8, 9], 2, [False, True, True, False, True, False])
    assert pm.sensitive_groups(seq) == [[1, 2], [4]]
    assert pm.extraction_requests(seq, [[1, 2], [4]]) == [([0], [5, 6]), ([0, 5, 6, 7], [8])]


def test_exact_rank_and_exposure_by_hand():
    # two candidates strictly likelier than the secret (nll 1.0 and 0.5); the tie does not count
    assert pm.exact_rank(2.0, [1.0, 3.0, 2.0, 0.5]) == 3
    assert pm.exposure_from_rank(3, 5) == pytest.approx(math.log2(5) - math.log2(3))
    assert pm.exposure_from_rank(1, 1024) == pytest.approx(10.0)


def test_secret_candidates_enumerate_or_sample_the_same_shape():
    import random

    every, space, exact = pm.secret_candidates("1 2", "0123456789", 1000, 10, random.Random(0))
    assert exact and space == 100 and len(every) == 99 and "1 2" not in every and "0 0" in every
    assert all(c[1] == " " for c in every)
    drawn, space, exact = pm.secret_candidates("1 2 3 4", "0123456789", 1000, 25, random.Random(0))
    assert not exact and space == 10_000 and len(drawn) == 25
    assert all(len(c) == 7 and c[1::2] == "   " for c in drawn)
    with pytest.raises(UndoError):
        pm.secret_candidates("ab", "0123456789", 10, 10, random.Random(0))


def test_skewnorm_exposure_recovers_a_normal_tail():
    samples = np.random.default_rng(0).normal(10.0, 2.0, 4000)
    # a secret two standard deviations likelier than typical: Phi(-2) = 0.02275, -log2 = 5.458
    assert pm.skewnorm_exposure(6.0, samples, 10**6) == pytest.approx(5.458, abs=0.25)
    assert pm.skewnorm_exposure(-100.0, samples, 10**6) == pytest.approx(math.log2(10**6))  # capped at log2 |R|


def test_membership_scores_by_hand():
    logp = [-1.0, -5.0, -2.0, -0.5, -3.0]
    assert pm.loss_score(logp) == pytest.approx(-2.3)
    assert pm.min_k_score(logp, 0.4) == pytest.approx(-4.0)   # the 2 lowest: -5, -3
    assert pm.min_k_score(logp, 0.1) == pytest.approx(-5.0)   # at least one
    mu, sigma = [-1.0, -1.0, -1.0, -1.0, -1.0], [1.0, 2.0, 0.5, 1.0, 4.0]
    # z = (logp - mu) / sigma = 0, -2, -2, 0.5, -0.5; the 2 lowest: -2, -2
    assert pm.min_k_plus_plus_score(logp, mu, sigma, 0.4) == pytest.approx(-2.0)
    text = "Kel Varo lives at 4 Elm Row."
    assert pm.zlib_score(logp, text) == pytest.approx(-2.3 / len(zlib.compress(text.encode())))


def test_mia_auc_privleak_and_perplexity_by_hand():
    # member > non-member in 5 of the 6 pairs
    assert pm.mia_auc([0.9, 0.8, 0.3], [0.5, 0.1]) == pytest.approx(5 / 6)
    assert pm.mia_auc([1.0], [1.0]) == pytest.approx(0.5)
    assert pm.privleak(0.8, 0.5) == pytest.approx(0.6)
    assert pm.privleak(0.5, 0.5) == 0.0
    leak = pm.privleak_metrics({"mia_loss_auc": 0.9, "mia_zlib_auc": 0.6}, {"mia_loss_auc": 0.6})
    assert leak == {"privleak_loss": pytest.approx(0.5)}
    assert pm.perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    with pytest.raises(UndoError):
        pm.mia_auc([], [0.1])


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: every quantity is a row of the table."""

    def __init__(self, vocab: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def test_token_stats_match_the_table_by_hand():
    model = BigramLM()
    seqs = [[1, 2, 3, 1], [4, 0]]
    stats = pm.token_stats(model, seqs, pad_id=0, batch_size=2)
    table = model.table.detach().double()
    for seq, st in zip(seqs, stats):
        assert len(st.logp) == len(seq) and st.logp[0] == 0
        for t in range(1, len(seq)):
            row = torch.log_softmax(table[seq[t - 1]], -1)
            p = row.exp()
            assert st.logp[t] == pytest.approx(row[seq[t]].item(), abs=1e-5)
            assert st.hit[t] == (row.argmax().item() == seq[t])
            assert st.mu[t] == pytest.approx((p * row).sum().item(), abs=1e-5)
            var = (p * row**2).sum().item() - (p * row).sum().item() ** 2
            assert st.sigma[t] == pytest.approx(math.sqrt(var), abs=1e-5)


def test_greedy_continuations_equal_a_plain_argmax_loop():
    tok = train_tokenizer(["a b c d e f g 0 1 2 3"], "bpe", 270)
    model = tiny_llama(tok)
    requests = [([tok.bos_token_id, 5, 6, 7], 4), ([tok.bos_token_id, 9], 6), ([tok.bos_token_id, 8, 8], 0)]
    got = pm.greedy_continuations(model, requests, tok.pad_token_id, tok.eos_token_id, batch_size=2)
    for (prefix, k), out in zip(requests, got):
        ids = list(prefix)
        with torch.no_grad():
            for _ in range(k):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:  # a continuation ends at EOS, without it
                    ids.pop()
                    break
        assert out == ids[len(prefix):]


# ---------------------------------------------------------------- the task's data


def test_synthetic_corpus_is_seeded_with_spans_on_the_values():
    a, b, c = privacy_task(0), privacy_task(0), privacy_task(1)
    assert a.records == b.records and a.records != c.records
    by = {s: [r for r in a.records if r.split == s] for s in ("forget", "retain", "unseen")}
    docs = {s: [r for r in rs if r.secret is None] for s, rs in by.items()}
    assert (len(docs["forget"]), len(docs["retain"]), len(docs["unseen"])) == (2, 4, 3)
    assert [r.repeat for r in by["forget"] if r.secret] == [1, 8]
    assert [r.repeat for r in by["unseen"] if r.secret] == [0, 0]
    for r in a.records:
        for start, end in r.spans:
            value = r.text[start:end]
            assert value.strip() == value and value and "{" not in value
        if r.secret is not None:  # "The PIN of X is 4 9." style: spaced digits, the only span
            assert r.spans == (r.secret,) and r.text[r.secret[0]:r.secret[1]].replace(" ", "").isdigit()
    form = next((r for r in a.records if r.text.startswith("Name: ")), None)
    if form is not None:  # each field of a form is a span
        assert len(form.spans) == 5
    # training: each forget sequence `repeat` times; no unseen text is ever trained
    forget = a.train_examples("forget")
    assert len(forget) == 2 + 1 + 8
    trained = {ex.completion for d in ("forget", "retain") for ex in a.train_examples(d)}
    assert not trained & {r.text for r in by["unseen"]}
    assert set(STYLES) >= {"bio", "form", "letter", "log", "note"}
    # document_repeats copies each person's document, not the canaries, and changes nothing else
    d = privacy_task(0, document_repeats=3)
    assert [r.text for r in d.records] == [r.text for r in a.records]
    assert len(d.train_examples("forget")) == 3 * 2 + 1 + 8


def test_options_are_validated():
    with pytest.raises(UndoError, match="forget_people"):
        from_dict(PrivacyOptions, {"people": 4, "forget_people": 4})
    with pytest.raises(UndoError, match="document_repeats"):
        from_dict(PrivacyOptions, {"document_repeats": 0})
    with pytest.raises(UndoError, match="canary_repeats"):
        from_dict(PrivacyOptions, {"canary_repeats": [0]})
    with pytest.raises(UndoError, match="files"):
        from_dict(PrivacyOptions, {"source": "files"})


def test_span_rows_are_pad_batch_rows_with_the_sensitive_tokens():
    task = privacy_task()
    tok = task_tokenizer(task)
    examples = task.train_examples("forget")[:5]
    rows = task.span_rows(tok, examples, 128)
    plain = pad_batch(tok, examples, "all", max_len=128)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(rows[key], plain[key])
    for i, ex in enumerate(examples):
        marked = tok.decode(rows["input_ids"][i][rows["sensitive"][i]].tolist())
        spans = task._spans[ex.completion]
        assert marked.replace(" ", "") == "".join(ex.completion[s:e] for s, e in spans).replace(" ", "")


def test_files_source_reads_jsonl_and_names_a_bad_line(tmp_path):
    lines = [{"text": "Ana Bel's phone is 0123.", "split": "forget", "spans": [[0, 7], [19, 23]]},
             {"text": "The code of Rob is 1 2 3.", "split": "forget", "secret": [19, 24], "repeat": 4},
             {"text": "Cal Dun lives in Rome.", "split": "retain"},
             {"text": "Eve Fox's phone is 9876.", "split": "unseen", "spans": [[0, 7]]}]
    path = tmp_path / "seqs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    task = build_task(TaskConfig("privacy", {"source": "files", "files": [str(path)]}), 0)
    canary = next(r for r in task.records if r.secret)
    assert canary.spans == ((19, 24),) and canary.repeat == 4 and task.records[0].spans == ((0, 7), (19, 23))
    assert len(task.train_examples("forget")) == 1 + 4
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"text": "x", "split": "later"}) + "\n")
    with pytest.raises(UndoError, match=r"seqs.jsonl:2: \"split\""):
        build_task(TaskConfig("privacy", {"source": "files", "files": [str(path)]}), 0)
    with pytest.raises(UndoError, match="span"):
        parse_record({"text": "abc", "split": "forget", "spans": [[2, 9]]}, "here")


def write_muse(root, retain_name="retain.json"):
    (root / "privleak").mkdir(parents=True)
    (root / "verbmem").mkdir()
    (root / "knowmem").mkdir()
    (root / "privleak" / "forget.json").write_text(json.dumps([
        "The mayor of Tull said the new bridge over the Sorn river opens in May, two years late and far over budget."]))
    (root / "privleak" / retain_name).write_text(json.dumps([
        "Heavy rain is due in Pell on Friday, forecasters said, with floods likely along the coast road by night."]))
    (root / "privleak" / "holdout.json").write_text(json.dumps([
        "A new bakery opened in Sarn this week, selling rye bread and plum cakes to queues that wrapped the square."]))
    verbmem = [{"prompt": "The bridge in Tull ", "gt": "opens in May."}]
    (root / "verbmem" / "forget.json").write_text(json.dumps(verbmem))
    (root / "knowmem" / "forget_qa.json").write_text(json.dumps([{"question": "When does the bridge open?",
                                                                  "answer": "May"}]))
    (root / "knowmem" / "forget_qa_icl.json").write_text(json.dumps([{"question": "Where?", "answer": "Tull"}]))
    (root / "knowmem" / "retain_qa.json").write_text(json.dumps([{"question": "Where is rain due?",
                                                                  "answer": "Pell"}]))


def test_muse_layout_loads_and_evaluates(tmp_path):
    write_muse(tmp_path / "news")
    data = load_muse(str(tmp_path / "news"), 2000)
    splits = [r.split for r in data.records]
    assert splits.count("forget") == 2 and splits.count("retain") == 1 and splits.count("unseen") == 1
    assert data.verbmem[0]["gt"] == "opens in May." and data.knowmem["forget"][0]["answer"] == "May"
    assert data.knowmem_icl["forget"][0]["answer"] == "Tull" and data.knowmem_icl["retain"] == []
    write_muse(tmp_path / "old", retain_name="retain2.json")  # the first release's name
    assert [r.split for r in load_muse(str(tmp_path / "old"), 2000).records].count("retain") == 1
    assert len(load_muse(str(tmp_path / "news"), 20).records) > 4  # long texts are cut into chunks
    with pytest.raises(UndoError, match="privleak/holdout.json"):
        (tmp_path / "news" / "privleak" / "holdout.json").rename(tmp_path / "gone.json")
        load_muse(str(tmp_path / "news"), 2000)
    (tmp_path / "gone.json").rename(tmp_path / "news" / "privleak" / "holdout.json")
    task = build_task(TaskConfig("privacy", {"source": "muse", "muse_dir": str(tmp_path / "news")}), 0)
    tok = task_tokenizer(task)
    metrics = task.evaluate(tiny_llama(tok), tok)
    for key in ("verbmem_rougeL", "knowmem_forget_rougeL", "knowmem_retain_rougeL", "mia_loss_auc", "forget_el10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert not any(k.endswith("exposure") for k in metrics)  # no canaries in MUSE


# ---------------------------------------------------------------- a model that memorises


@pytest.fixture(scope="module")
def memorised():
    return train_memoriser()


def train_memoriser():
    """A tiny Llama trained 250 steps on the tiny task's forget + retain sequences."""
    task = privacy_task()
    tok = task_tokenizer(task)
    model = tiny_llama(tok).train()
    rows = pad_batch(tok, task.train_examples("forget") + task.train_examples("retain"), "all", max_len=128)
    return task, tok, train_on_rows(model, rows, steps=250, seed=0).eval()


def train_on_rows(model, rows, steps: int, seed: int):
    """`steps` AdamW steps (lr 3e-3) on seeded batches of 8 of `rows` (pad_batch's)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(rows["input_ids"].shape[0], (8,), generator=g)
        logits = model(input_ids=rows["input_ids"][idx], attention_mask=rows["attention_mask"][idx]).logits
        loss = masked_ce(logits, rows["labels"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_a_trained_model_memorises_what_it_saw_and_not_the_unseen(memorised):
    task, tok, model = memorised
    m = task.evaluate(model, tok)
    assert m["forget_ma"] > 0.9 and m["forget_el10"] > 0.8 and m["retain_el10"] > 0.8
    assert m["forget_el10"] >= 3 * m["unseen_el10"] and m["forget_sel10"] > m["unseen_sel10"]
    assert task.quality_gate(m, "all") == [] and task.quality_gate({**m, "unseen_el10": 0.9}, "all")
    assert task.quality_gate({**m, "retain_el10": 0.0}, "all") == []  # the base is held to its forget set
    assert task.quality_gate({**m, "retain_el10": 0.0}, "retain") == ["retain EL_10 0.000 < 3 x unseen "
                                                                      f"{m['unseen_el10']:.3f}"]
    assert m["forget_span_extract"] > m["unseen_span_extract"]
    assert m["forget_exposure_r8"] > m["unseen_exposure"] and m["forget_canary_extract_r8"] == 1.0
    assert 0 <= m["unseen_exposure"] <= math.log2(100) + 1e-9
    assert m["forget_ppl"] < m["unseen_ppl"]
    for attack in ("loss", "zlib", "mink", "minkpp"):
        assert m[f"mia_{attack}_auc"] > 0.8
    quick = task.evaluate(model, tok, quick=True)
    assert {"forget_ma", "forget_el10", "unseen_ma", "unseen_el10", "retain_ma"} <= set(quick)
    assert not any("exposure" in k or "mia" in k for k in quick)
    items = task.forget_items(quick=True)
    assert task.score_items(model, tok, items)["forget_el10"] == pytest.approx(quick["forget_el10"])
    first, second = task.forget_halves()
    assert first["forget"] and second["forget"] and not {e.completion for e in first["forget"]} & {
        e.completion for e in second["forget"]}


def test_shared_continuations_give_the_brute_force_el(memorised):
    task, tok, model = memorised
    records = task.eval_records("unseen")[:2] + task.eval_records("forget")[:2]
    seqs = [pm.encode_sequence(tok, r.text, r.spans) for r in records]
    rows, _ = pm.sequence_metrics(model, tok, seqs, 10)
    for seq, row in zip(seqs, rows):
        wanted = pm.continuation_requests(seq, 10, True, None)
        outs = pm.greedy_continuations(model, [(seq.ids[:t], k) for t, k in wanted.items()], tok.pad_token_id,
                                       tok.eos_token_id)
        el, sel = pm.extraction_scores(seq, dict(zip(wanted, outs)), 10)
        assert (row["el"], row["sel"]) == pytest.approx((el, sel), nan_ok=True)


def test_knowledge_unlearning_ascends_until_the_unseen_level(memorised):
    import copy

    from undo.stages.unlearn import build_streams
    from undo.training import train

    task, tok, model = memorised
    model = copy.deepcopy(model)
    method = build_method("knowledge_unlearning", {}, "privacy")
    cfg = from_dict(TrainConfig, {**method.train_defaults, "steps": 40, "lr": 1e-3, "batch_size": 4,
                                  "checkpoint_every": 0})
    streams = build_streams(task, tok, method, cfg, 0)
    assert streams["forget"].n == 11  # 2 documents + 9 canary copies
    result = train(model, method.loss, streams, cfg, seed=0, on_start=method.start,
                   evaluate=lambda m: task.evaluate(m, tok, quick=True), should_stop=method.stop_on_eval)
    assert streams["forget"].n == 4   # each distinct sequence once: 2 documents, 2 canaries
    first, last = result.history[0], result.history[-1]
    assert result.stopped_early and result.steps < 40
    assert last["forget_ma"] <= first["unseen_ma"] and last["forget_el10"] <= first["unseen_el10"]
    assert first["forget_el10"] > 0.8  # the rule held first at the last evaluation, not before
    assert not any(h["forget_ma"] <= first["unseen_ma"] and h["forget_el10"] <= first["unseen_el10"]
                   for h in result.history[:-1])


# ---------------------------------------------------------------- methods: losses by hand


BATCH = {"input_ids": torch.tensor([[1, 2, 3, 4], [1, 3, 0, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
         "labels": torch.tensor([[IGNORE, 2, 3, 4], [IGNORE, 3, IGNORE, IGNORE]]),
         "sensitive": torch.tensor([[False, False, True, True], [False, True, False, False]])}


def table_logp(model, prev: int, nxt: int) -> float:
    return torch.log_softmax(model.table.detach()[prev], -1)[nxt].item()


def test_knowledge_unlearning_loss_is_minus_the_forget_ce_by_hand():
    model = BigramLM()
    method = build_method("knowledge_unlearning", {}, "privacy")
    out = method.loss(model, {"forget": BATCH})
    pairs = [(1, 2), (2, 3), (3, 4), (1, 3)]  # (current, next) of every scored token
    ce = -sum(table_logp(model, a, b) for a, b in pairs) / 4
    assert out.loss.item() == pytest.approx(-ce, abs=1e-5)


def test_span_ascent_loss_is_the_mean_log_prob_of_sensitive_tokens_by_hand():
    model = BigramLM()
    logits = model(BATCH["input_ids"]).logits
    # sensitive scored tokens: row 0 tokens 3 (after 2) and 4 (after 3); row 1 token 3 (after 1)
    want = (table_logp(model, 2, 3) + table_logp(model, 3, 4) + table_logp(model, 1, 3)) / 3
    assert span_ascent_loss(logits, BATCH["labels"], BATCH["sensitive"]).item() == pytest.approx(want, abs=1e-5)
    none = torch.zeros_like(BATCH["sensitive"])
    assert span_ascent_loss(logits, BATCH["labels"], none).item() == 0.0
    method = build_method("selective_forgetting", {}, "privacy")
    assert method.loss(model, {"forget": BATCH}).loss.item() == pytest.approx(want, abs=1e-5)


def test_least_likely_mask_picks_the_lowest_scored_tokens():
    logp = torch.tensor([[-1.0, -3.0, -0.5, -2.0], [-9.0, -0.1, 0.0, 0.0]])
    scored = torch.tensor([[True, True, True, True], [False, True, False, False]])
    mask = least_likely_mask(logp, scored, 0.5)  # row 0: the 2 lowest of 4 (positions 1, 3 -> tokens 2, 4)
    assert mask.tolist() == [[False, False, True, False, True], [False, False, True, False, False]]


def test_stop_rules_and_needs():
    ku = build_method("knowledge_unlearning", {}, "privacy")
    start = {"forget_ma": 0.9, "unseen_ma": 0.3, "forget_el10": 0.8, "unseen_el10": 0.05}
    assert not ku.stop_on_eval(start) and ku.levels == {"ma": 0.3, "el10": 0.05}
    # the level stays the starting model's: a lower unseen level later does not move it
    assert ku.stop_on_eval({"forget_ma": 0.3, "unseen_ma": 0.1, "forget_el10": 0.05, "unseen_el10": 0.0})
    assert not ku.stop_on_eval({"forget_ma": 0.2, "unseen_ma": 0.1, "forget_el10": 0.06, "unseen_el10": 0.0})
    current = build_method("knowledge_unlearning", {"threshold": "current"}, "privacy")
    assert current.stop_on_eval({"forget_ma": 0.1, "unseen_ma": 0.1, "forget_el10": 0.0, "unseen_el10": 0.0})
    assert not current.stop_on_eval({"forget_ma": 0.2, "unseen_ma": 0.1, "forget_el10": 0.0, "unseen_el10": 0.0})
    with pytest.raises(UndoError, match="stop_rule"):
        ku.stop_on_eval({"forget_acc": 0.1})
    assert not build_method("knowledge_unlearning", {"stop_rule": "none"}).stop_on_eval({})
    seul = build_method("selective_forgetting", {"stop_rule": "unseen"}, "privacy")
    assert seul.stop_on_eval({"forget_sma": 0.1, "unseen_sma": 0.2, "forget_sel10": 0.0, "unseen_sel10": 0.1})
    assert seul.needs() == {"forget", "spans"} and seul.needs() <= set(NEEDS)
    online = build_method("selective_forgetting", {"spans": "online", "retain_weight": 1.0})
    assert online.needs() == {"forget", "retain"}
    assert ku.needs() == {"forget"} and ku.row_format == "padded" and ku.train_defaults["eval_every"] == 1


def test_distinct_rows_keep_one_copy_of_each_row():
    rows = {"input_ids": torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2]]), "attention_mask": torch.ones(4, 2),
            "labels": torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2]]), "sensitive": torch.tensor([[1, 0], [0, 1],
                                                                                            [1, 0], [1, 0]])}
    out = distinct_rows(BatchStream(rows, 2, seed=3, bucket=True))
    assert out.rows["input_ids"].tolist() == [[1, 2], [3, 4]] and out.rows["sensitive"].tolist() == [[1, 0], [0, 1]]
    assert out.batch_size == 2 and out.seed == 3 and out.bucket


def test_selective_forgetting_streams_offline_spans_and_online_masks(memorised):
    from undo.stages.unlearn import build_streams

    task, tok, model = memorised
    offline = build_method("selective_forgetting", {}, "privacy")
    cfg = from_dict(TrainConfig, {**offline.train_defaults, "batch_size": 4})
    streams = build_streams(task, tok, offline, cfg, 0)
    offline.start(model, streams)
    rows = streams["forget"].rows
    assert streams["forget"].n == 4 and rows["sensitive"].any(1).all()
    online = build_method("selective_forgetting", {"spans": "online", "online_fraction": 0.25}, "privacy")
    streams = build_streams(task, tok, online, cfg, 0)
    assert "sensitive" not in streams["forget"].rows
    online.start(model, streams)
    rows = streams["forget"].rows
    scored = (rows["labels"] != IGNORE).sum(1)
    assert rows["sensitive"].sum(1).tolist() == [math.ceil(0.25 * n) for n in scored.tolist()]
    batch = streams["forget"].batch(0)
    assert online.loss(model, {"forget": batch}).loss.item() < 0


def test_privacy_quick_preset_builds_its_graph():
    from undo.engine.graph import build_graph
    from undo.experiment import load_experiment

    exp = load_experiment("privacy-quick")
    ids = set(build_graph(exp).nodes)
    assert {"seed0/unlearn/knowledge_unlearning", "seed0/unlearn/selective_forgetting",
            "seed0/undo/undo_a0.5"} <= ids
    assert any(i.startswith("seed0/attack/relearn/undo_a0.5/") for i in ids)
    assert build_task(exp.task, 0).records  # the task's options are valid
