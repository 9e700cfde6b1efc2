"""benchmarks/paper_claims.py: the paper's four claims judged on means over every graph seed, with
"not separable" when the spreads overlap; and the run behind them (`--seeds N`, `arithmetic-seeds`)."""

import copy
import importlib.util
from pathlib import Path

import pytest

from undo.cli import main as undo_main
from undo.experiment import load_experiment
from undo.report import spread, summarize
from undo.store import ResultStore

_SPEC = importlib.util.spec_from_file_location("paper_claims",
                                               Path(__file__).parent.parent / "benchmarks" / "paper_claims.py")
claims = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(claims)

TASK = {"name": "arithmetic", "forget_metric": "forget_acc", "retain_metric": "retain_acc",
        "higher_is_better": True, "metric_label": "accuracy", "oracle_pretrain_flops": 1e12}
# per model: kind, forget before, worst forget after 60 attack steps (per seed 0, 1, 2), alpha,
# distillation FLOPs up to recovery per seed (None: never recovered; absent: not a distillation)
RUN = {
    "base": ("base", 0.9, [0.95, 0.95, 0.95], None, None),
    "oracle": ("oracle", 0.05, [0.10, 0.12, 0.14], None, None),     # mean 0.12, 95% t-interval [0.070, 0.170]
    "maxent": ("method", 0.02, [0.60, 0.65, 0.70], None, None),
    "oracle_matching": ("oracle_matching", 0.06, [0.70, 0.75, 0.80], None, None),
    "unlearn_distill": ("unlearn_distill", 0.03, [0.12, 0.13, 0.14], 0.0, [5e11, 5e11, 5e11]),
    "undo_a0.3": ("undo", 0.03, [0.50, 0.55, 0.60], 0.3, [1e11, 1e11, 1e11]),
    "undo_a0.8": ("undo", 0.03, [0.12, 0.13, 0.14], 0.8, [3.0e11, 3.2e11, 3.4e11]),
}


def make_store(path, run):
    store = ResultStore(path)
    for seed in (0, 1, 2):
        for name, (kind, before, after, alpha, recovered) in run.items():
            meta = {}
            if recovered is not None:
                hit = recovered[seed]
                meta = {"alpha": alpha, "teacher": "maxent", "recovered": hit is not None,
                        "recovered_step": 100 if hit is not None else None, "recovered_flops": hit}
            store.record_model(name, kind, {"forget_acc": before, "retain_acc": 0.9}, 1e12, 1.0, meta, seed=seed)
            for step, value in ((0, before), (60, after[seed])):
                store.record_attack(name, 1e-3, step, {"forget_acc": value}, seed=seed)
    return store


def verdicts(tmp_path, run=RUN, task=TASK):
    summary = summarize(make_store(tmp_path / "r.sqlite", run), task)
    return {text[0]: (verdict, parts) for text, verdict, parts in claims.check(summary, tolerance=0.1)}, summary


def changed(name, **fields):
    run = copy.deepcopy(RUN)
    kind, before, after, alpha, recovered = run[name]
    values = {"before": before, "after": after, "recovered": recovered, **fields}
    run[name] = (kind, values["before"], values["after"], alpha, values["recovered"])
    return run


def test_below_compares_intervals_and_says_when_they_overlap():
    three = spread([0.10, 0.12, 0.14])  # 0.12 +- 4.302653 * 0.02 / sqrt(3) = 0.12 +- 0.04968
    assert claims.below(spread([0.05]), three) == claims.HELD
    assert claims.below(spread([0.06, 0.07, 0.08]), three) == claims.NOT_SEPARABLE  # 0.07 + 0.0497 > 0.0703
    assert claims.below(spread([0.3]), three) == claims.NOT_HELD
    assert claims.below(spread([0.2]), spread([0.12]), margin=0.1) == claims.HELD   # 0.2 < 0.22
    assert claims.below(spread([0.22]), spread([0.12]), margin=0.1) == claims.NOT_SEPARABLE  # a tie
    # two seeds: [min, max]
    assert claims.below(spread([0.1, 0.2]), spread([0.19, 0.3])) == claims.NOT_SEPARABLE
    assert claims.combine([claims.HELD, claims.NOT_SEPARABLE]) == claims.NOT_SEPARABLE
    assert claims.combine([claims.NOT_SEPARABLE, claims.NOT_HELD]) == claims.NOT_HELD
    assert claims.combine([]) == claims.NOT_HELD


def test_all_four_claims_hold_on_a_run_made_to_hold_them(tmp_path):
    results, summary = verdicts(tmp_path)
    assert {k: v[0] for k, v in results.items()} == {"1": "held", "2": "held", "3": "held", "4": "held"}
    text = claims.render(summary, claims.check(summary, 0.1))
    assert "3 graph seeds (0, 1, 2)" in text and "4/4 claims held" in text
    assert "oracle 0.120 [0.100, 0.140] ±0.050" in text  # numbers with their spreads
    assert "undo_a0.8 0.320 [0.300, 0.340] ±0.050" in text  # compute to recovery / oracle pretraining


def test_a_student_that_never_recovered_holds_no_claim(tmp_path):
    results, _ = verdicts(tmp_path, changed("unlearn_distill", recovered=[5e11, None, 5e11]))
    verdict, parts = results["2"]
    assert verdict == "not held"
    assert any("recovered in 2/3 seeds (steps 100, no, 100)" in numbers for _, _, numbers in parts)
    # claim 4 takes only settings recovered in every seed: without any, not held
    results, _ = verdicts(tmp_path / "b", {**RUN, "undo_a0.3": changed("undo_a0.3", recovered=[None] * 3)["undo_a0.3"],
                                           "undo_a0.8": changed("undo_a0.8", recovered=[1e11, None, 1e11])["undo_a0.8"]})
    assert results["4"][0] == "not held" and results["3"][0] == "not held"


def test_overlapping_spreads_are_not_separable_where_the_first_seed_alone_would_hold(tmp_path):
    # oracle matching after the attack: 0.80 on seed 0 (clearly above the oracle), 0.10 and 0.15 on the
    # others: over three seeds its interval overlaps the oracle's
    results, _ = verdicts(tmp_path, changed("oracle_matching", after=[0.80, 0.10, 0.15]))
    assert results["1"][0] == "not separable"
    # a plain method as robust as the oracle: UNDO's advantage is not held
    results, _ = verdicts(tmp_path / "b", changed("maxent", after=[0.10, 0.11, 0.12]))
    assert results["4"][0] == "not held"


def test_cross_entropy_claims_read_higher_as_more_robust(tmp_path):
    """The same run in cross-entropy terms (CE = 5 - accuracy x 4): every verdict is unchanged."""
    def as_ce(values):
        return [5 - 4 * v for v in values]
    run = {name: (kind, 5 - 4 * before, as_ce(after), alpha, rec) for name, (kind, before, after, alpha, rec)
           in RUN.items()}
    store = ResultStore(tmp_path / "ce.sqlite")
    for seed in (0, 1, 2):  # the same rows, recorded under CE metric names
        for name, (kind, before, after, alpha, recovered) in run.items():
            meta = {} if recovered is None else {"alpha": alpha, "teacher": "maxent", "recovered": True,
                                                 "recovered_step": 100, "recovered_flops": recovered[seed]}
            store.record_model(name, kind, {"forget_ce": before, "retain_ce": 1.0}, 1e12, 1.0, meta, seed=seed)
            for step, value in ((0, before), (60, after[seed])):
                store.record_attack(name, 1e-3, step, {"forget_ce": value}, seed=seed)
    task = {**TASK, "forget_metric": "forget_ce", "retain_metric": "retain_ce", "higher_is_better": False}
    summary = summarize(store, task)
    # tolerance 0.1 relative to the oracle's CE (4.52): a margin of 0.452 = 0.113 accuracy; as held as before
    assert [v for _, v, _ in claims.check(summary, tolerance=0.1)] == ["held"] * 4


def test_seeds_flag_and_the_arithmetic_seeds_preset(capsys, tmp_path):
    exp = load_experiment("arithmetic-seeds")
    base = load_experiment("arithmetic")
    assert exp.all_seeds() == [0, 1, 2] and exp.name == "arithmetic-seeds"
    assert (exp.unlearn, exp.undo, exp.attacks, exp.pretrain) == (base.unlearn, base.undo, base.attacks, base.pretrain)
    assert undo_main(["plan", "quick", "--seeds", "3", "--run-dir", str(tmp_path)]) == 0
    stages = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.startswith("seed")]
    assert {s.split("/")[0] for s in stages} == {"seed0", "seed1", "seed2"}
    assert undo_main(["plan", "quick", "--seeds", "0", "--run-dir", str(tmp_path)]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_a_config_extends_another_and_a_loop_is_one_clear_error(tmp_path):
    from undo.errors import UndoError
    (tmp_path / "mine.yaml").write_text("extends: quick\nname: mine\nundo: {alphas: [0.2]}\n")
    exp, quick = load_experiment(str(tmp_path / "mine.yaml")), load_experiment("quick")
    assert exp.name == "mine" and exp.undo.alphas == [0.2]
    assert exp.undo.distill == quick.undo.distill and exp.pretrain == quick.pretrain  # merged, not replaced
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UndoError, match="loops back"):
        load_experiment(str(tmp_path / "a.yaml"))
