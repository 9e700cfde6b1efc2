"""A distillation's "recovered": the first step its stop rule held, recorded whether or not training
stopped there, with the FLOPs spent up to it; the rule's tolerance kind follows the metric's kind."""

import copy
import json
from types import SimpleNamespace

import pytest

from undo.config import from_dict
from undo.engine.run import run_experiment
from undo.errors import UndoError
from undo.experiment import ExperimentConfig
from undo.stages.undo import recovered_at, retain_recovered, stop_metric, stop_rule_for


def test_auto_rule_is_absolute_for_accuracies_and_relative_for_cross_entropies():
    assert stop_rule_for("auto", higher_is_better=True) == "absolute"
    assert stop_rule_for("auto", higher_is_better=False) == "relative"
    assert stop_rule_for("absolute", higher_is_better=False) == "absolute"
    assert stop_rule_for("none", higher_is_better=True) == "none"


def test_the_checked_metric_and_its_direction():
    ce_task = SimpleNamespace(retain_metric="retain_ce", higher_is_better=False)
    assert stop_metric(ce_task, {"retain_ce": 2.0, "retain_acc": 0.5}) == ("retain_ce", False)
    # no CE in the quick evaluation: its accuracy, read as an accuracy (higher is better)
    assert stop_metric(ce_task, {"retain_acc": 0.5}) == ("retain_acc", True)
    with pytest.raises(UndoError, match="neither retain_ce nor retain_acc"):
        stop_metric(ce_task, {"forget_ce": 1.0})


def test_recovered_at_is_the_first_step_the_rule_held_with_its_flops():
    check = retain_recovered("absolute", 0.05, True, teacher_value=0.9)  # recovered at >= 0.85
    history = [{"step": 0, "r": 0.5}, {"step": 25, "r": 0.84}, {"step": 50, "r": 0.88},
               {"step": 75, "r": 0.80}, {"step": 100, "r": 0.9}]
    flops = [0.0, 250.0, 500.0, 750.0, 1000.0]
    assert recovered_at(history, flops, check, "r") == (50, 500.0)  # falling back later does not undo it
    assert recovered_at(history[:2], flops[:2], check, "r") == (None, None)
    relative = retain_recovered("relative", 0.05, False, teacher_value=2.0)  # CE <= 2.1
    assert recovered_at([{"step": 0, "ce": 2.5}, {"step": 10, "ce": 2.05}], [0.0, 9.0], relative, "ce") == (10, 9.0)


MICRO = {
    "name": "micro", "seed": 0,
    "task": {"name": "arithmetic", "options": {"examples_per_operation": 40, "eval_per_format": 4,
                                                "quick_eval_per_format": 2}},
    "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "pretrain": {"steps": 4, "lr": 3e-3, "batch_size": 8, "seq_len": 48, "checkpoint_every": 0},
    "unlearn": {"retain_tolerance": 10.0, "methods": [{"method": "graddiff", "train": {
        "steps": 1, "batch_size": 8, "seq_len": 48, "checkpoint_every": 0}}]},
    "undo": {"alphas": [0.5], "unlearn_and_distill": False, "stop_tolerance": 10.0,  # holds from step 0
             "distill": {"steps": 3, "eval_every": 1, "batch_size": 8, "seq_len": 48, "checkpoint_every": 0}},
    "attacks": [],
}


def test_recovery_is_recorded_when_training_runs_on_and_stops_it_otherwise(tmp_path):
    runs = {}
    for stop in (False, True):
        raw = copy.deepcopy(MICRO)
        raw["undo"]["stop_at_recovery"] = stop
        run_experiment(from_dict(ExperimentConfig, raw), tmp_path)
        runs[stop] = json.loads((tmp_path / "seed0" / "undo" / "undo_a0.5" / "result.json").read_text())
    ran_on, stopped = runs[False], runs[True]
    assert ran_on["steps"] == 3 and not ran_on["stopped_early"]  # the whole budget
    assert ran_on["recovered"] and ran_on["recovered_step"] == 0 and ran_on["recovered_flops"] == 0.0
    assert ran_on["flops"] > 0 and ran_on["stop_rule"] == "absolute"  # auto, on an accuracy
    assert stopped["steps"] == 0 and stopped["stopped_early"] and stopped["recovered_step"] == 0
    # cumulative compute from scratch: the base's pretraining, the teacher's unlearning, the distillation
    own = {n: json.loads((tmp_path / "seed0" / n / "result.json").read_text())["flops"]
           for n in ("base", "unlearn/graddiff")}
    assert ran_on["flops_total"] == pytest.approx(own["base"] + own["unlearn/graddiff"] + ran_on["flops"])
    assert ran_on["flops_ancestry"]["seed0/select/undo_teacher"] == 0.0  # choosing costs nothing itself
    assert set(ran_on["flops_ancestry"]) == {"seed0/base", "seed0/unlearn/graddiff", "seed0/select/undo_teacher",
                                             "seed0/undo/undo_a0.5"}
