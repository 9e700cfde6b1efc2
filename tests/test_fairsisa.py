"""The fair_classification task and FairSISA: the data's planted skew, the LM as a classifier
(label-token margins, majority vote of an ensemble, a post-processor carried in the config),
FairSISA's deletion + equalized-odds post-processing on a gapped ensemble, and one run
through the engine (shard stages, the saved post-processed ensemble, deletion_cost)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_engine import TRAIN, micro
from undo import fairness
from undo.data import aux_stream
from undo.engine.run import run_experiment
from undo.ensemble import EnsembleForCausalLM
from undo.errors import UndoError
from undo.methods import build_method
from undo.models import load_model
from undo.tasks import TaskConfig, build_task
from undo.tasks.fair_classification import GROUPS, label_token_ids, member_margins
from undo.tokenization import train_tokenizer
from undo.training import TrainConfig, lm_loss, train

SMALL = {"train_examples": 300, "forget_examples": 4, "fit_examples": 300, "test_examples": 300,
         "quick_eval_examples": 50, "toxic_rate_a": 0.2, "toxic_rate_b": 0.8, "word_signal": 0.75}
S, R = 3, 2


def small_task(seed: int = 0, **options):
    return build_task(TaskConfig("fair_classification", {**SMALL, **options}), seed)


def small_llama(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gapped():
    """A task, its tokenizer, and a model trained briefly on it: it has learned the group's base
    rate before the content words (a wide equalized-odds gap, as the skew plants). One deleted
    sentence: one shard is retrained."""
    task = small_task(forget_examples=1)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    model = small_llama(tok, 0)
    examples = task.train_examples("retain") + task.train_examples("forget")
    cfg = TrainConfig(steps=60, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=5, checkpoint_every=0)
    train(model, lm_loss, {"train": aux_stream(tok, task, examples, 16, 64, 0)}, cfg, seed=0, desc="gapped")
    return task, tok, model.eval().requires_grad_(False)


def jittered(model, seed: int, scale: float = 0.002):
    """A copy of `model` with seeded noise on its weights: ensemble members that differ a little."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


# ---------------------------------------------------------------- the task

def test_the_data_has_the_planted_skew_and_distinct_sentences():
    task = small_task(test_examples=2000, forget_examples=4)
    test = task.split("test")
    y, g = np.array([r.label for r in test]), np.array([r.group for r in test])
    assert abs(y[g == 0].mean() - 0.2) < 0.05 and abs(y[g == 1].mean() - 0.8) < 0.05
    texts = [r.text for split in ("train", "fit", "test") for r in task.split(split)]
    assert len(set(texts)) == len(texts)
    forget, retain = task.train_examples("forget"), task.train_examples("retain")
    assert len(forget) == 4 and len(retain) == 296 and not set(forget) & set(retain)
    assert forget[0].prompt.endswith("\nToxic:") and forget[0].completion in ("yes", "no")
    assert [r.text for r in small_task(seed=0).split("fit")] == [r.text for r in small_task(seed=0).split("fit")]
    assert [r.text for r in small_task(seed=1).split("fit")] != [r.text for r in small_task(seed=0).split("fit")]


def test_a_margin_is_p_yes_minus_p_no_after_the_prompt(gapped):
    task, tok, model = gapped
    records = task.split("test")[:5]
    no, yes = label_token_ids(tok)
    margins = member_margins(model, tok, records)
    for k, r in enumerate(records):
        ids = torch.tensor([[tok.bos_token_id] + tok(r.example().prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0, -1].softmax(-1)
        assert margins[0, k] == pytest.approx((probs[yes] - probs[no]).item(), abs=1e-5)


def test_an_ensemble_predicts_by_majority_vote_and_by_the_post_processor_in_its_config(gapped):
    task, tok, model = gapped
    ensemble = EnsembleForCausalLM.from_members([jittered(model, s, 0.05) for s in range(3)]).eval()
    test = task.split("test")
    margins, y, g = task.scored(ensemble, tok, test)
    vote = fairness.majority_vote(margins)
    metrics = task.evaluate(ensemble, tok)
    assert metrics["acc"] == pytest.approx(np.mean(vote == y))
    assert metrics["member_acc"] == pytest.approx(np.mean(fairness.decisions(margins) == y))
    post = {"variant": "vote", "members": 3, "groups": 2, "table": [[0.0, 0.5], [0.25, 1.0]]}
    ensemble.config.fair_postprocess = post
    prob = np.where(vote == 1, np.where(g == 0, 0.5, 1.0), np.where(g == 0, 0.0, 0.25))
    want = fairness.group_rates(prob, y, g, GROUPS)
    got = task.evaluate(ensemble, tok)
    assert got["acc"] == pytest.approx(want["acc"]) and got["eo_gap"] == pytest.approx(want["eo_gap"])


def test_bad_task_options_stop_with_one_clear_message():
    for options, match in (({"forget_examples": 0}, "forget_examples must be in"),
                           ({"toxic_rate_b": 1.0}, "toxic_rate_b must be strictly between 0 and 1"),
                           ({"fit_examples": 0}, "fit_examples must be at least 1")):
        with pytest.raises(UndoError, match=match):
            small_task(**options)


# ---------------------------------------------------------------- the method

def fairsisa_on(gapped, variant: str):
    """FairSISA over stand-in shard checkpoints (jittered copies of the gapped model); 0 retraining
    steps, so a retrained shard is its checkpoint before the deleted slice (a fresh init at slice 0)."""
    task, tok, model = gapped
    method = build_method("fairsisa", {"shards": S, "slices": R, "evaluate_before": False, "postprocess": variant,
                                       "slice_train": {"steps": 0, "batch_size": 8, "seq_len": 64}}, seed=0)
    method.attach(aux={name: jittered(model, 10 + k) for k, name in enumerate(method.aux_models())})
    method.bind_task(task, tok)
    return method, method.export(model)


@pytest.mark.parametrize("variant", fairness.VARIANTS)
def test_fairsisa_narrows_the_gap_of_the_sisa_vote_on_held_out_data(gapped, variant):
    task, tok, _ = gapped
    method, ensemble = fairsisa_on(gapped, variant)
    post = ensemble.config.fair_postprocess
    assert post["variant"] == variant and post["members"] == S
    after = task.evaluate(ensemble, tok)
    del ensemble.config.fair_postprocess  # the same shard models as plain SISA: the majority vote
    before = task.evaluate(ensemble, tok)
    assert before["eo_gap"] > 0.15
    assert after["eo_gap"] < before["eo_gap"] / 2
    report = method.report()["fairsisa"]
    assert report["fit_after"]["eo_gap"] < report["fit_before"]["eo_gap"]
    if variant != "members":  # the LP's constraints hold on the data it was fitted on
        assert report["fit_after"]["eo_gap"] == pytest.approx(0.0, abs=1e-6)


def test_the_post_processor_is_fitted_on_the_fit_split_of_the_retrained_ensemble(gapped):
    task, tok, _ = gapped
    method, ensemble = fairsisa_on(gapped, "vote")
    post = ensemble.config.fair_postprocess
    margins, y, g = task.scored(ensemble, tok, task.split("fit"))
    refit = fairness.fit_postprocessor("vote", margins, y, g, 2)
    assert np.allclose(post["table"], refit["table"], atol=1e-6)
    assert method.report()["metrics"]["deletion_cost"] == method.report()["sisa"]["retrain_fraction"]["flops"]


def test_fairsisa_needs_a_task_with_labels_and_groups_and_valid_options():
    from test_sisa import sisa_setup

    method, task, base, aux = sisa_setup(0, steps=0)  # SISA's list task: no labels, no groups
    fair = build_method("fairsisa", {"shards": 3, "slices": 3, "evaluate_before": False}, seed=0)
    fair.attach(aux=aux)
    fair.bind_task(task, None)
    with pytest.raises(UndoError, match="use task fair_classification"):
        fair.export(base)
    with pytest.raises(UndoError, match="'postprocess'|is not allowed"):
        build_method("fairsisa", {"postprocess": "median"})
    with pytest.raises(UndoError, match="at most 12 shards"):
        build_method("fairsisa", {"postprocess": "vector", "shards": 13})


# ---------------------------------------------------------------- through the engine

def test_the_engine_saves_a_post_processed_ensemble_with_its_deletion_cost(tmp_path):
    exp = micro(task={"name": "fair_classification", "options": {**SMALL, "train_examples": 120, "fit_examples": 60,
                                                                 "test_examples": 60, "gate_acc": 0.0}},
                models={"base": {}}, undo__after="none", attacks=[], unlearn__methods=[{
                    "method": "fairsisa", "options": {"shards": 3, "slices": 2, "evaluate_before": False,
                                                      "slice_train": {**TRAIN, "steps": 2}}}])
    run_experiment(exp, tmp_path)
    out = tmp_path / "seed0" / "unlearn" / "fairsisa"
    result = json.loads((out / "result.json").read_text())
    assert 0 < result["metrics"]["deletion_cost"] <= 1
    assert {"acc", "eo_gap", "dtpr", "dfpr", "forget_acc"} <= set(result["metrics"])
    model, tok = load_model(out / "model")
    assert isinstance(model, EnsembleForCausalLM) and model.config.fair_postprocess["variant"] == "vote"
    task = build_task(exp.task, 0)
    assert task.evaluate(model, tok)["acc"] == pytest.approx(result["metrics"]["acc"])
