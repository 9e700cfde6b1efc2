import math
import random
import sqlite3

import pytest

from undo.errors import UndoError
from undo.store import ResultStore, worst_case, worst_case_curve


def point(lr, step, **metrics):
    return {"lr": lr, "step": step, "metrics": metrics}


# Three learning rates, three evaluation steps; values picked by hand.
POINTS = [
    point(1e-4, 0, acc=0.10), point(1e-4, 10, acc=0.20), point(1e-4, 20, acc=0.30),
    point(1e-3, 0, acc=0.10), point(1e-3, 10, acc=0.50), point(1e-3, 20, acc=0.40),
    point(1e-2, 0, acc=0.10), point(1e-2, 10, acc=0.05), point(1e-2, 20, acc=0.90),
]


def test_worst_case_curve_takes_the_max_when_higher_is_better():
    # step 0: all tie at 0.10 -> smallest lr; step 10: 0.50 at 1e-3; step 20: 0.90 at 1e-2
    assert worst_case_curve(POINTS, "acc", higher_is_better=True) == [(0, 0.10, 1e-4), (10, 0.50, 1e-3), (20, 0.90, 1e-2)]


def test_worst_case_curve_takes_the_min_when_lower_is_better():
    # step 10: 0.05 at 1e-2; step 20: 0.30 at 1e-4
    assert worst_case_curve(POINTS, "acc", higher_is_better=False) == [(0, 0.10, 1e-4), (10, 0.05, 1e-2), (20, 0.30, 1e-4)]


def test_worst_case_curve_breaks_ties_by_smallest_lr_whatever_the_order():
    tied = [point(3e-4, 5, ce=1.5), point(1e-4, 5, ce=1.5), point(1e-3, 5, ce=1.5), point(2e-3, 5, ce=2.0)]
    for seed in range(5):
        shuffled = tied[:]
        random.Random(seed).shuffle(shuffled)
        assert worst_case_curve(shuffled, "ce", higher_is_better=False) == [(5, 1.5, 1e-4)]
        assert worst_case_curve(shuffled, "ce", higher_is_better=True) == [(5, 2.0, 2e-3)]


def test_worst_case_curve_skips_missing_and_nan_values():
    points = [point(1e-3, 0, acc=float("nan")), point(1e-4, 0, acc=0.2), point(1e-4, 10, other=1.0),
              point(1e-3, 20, acc=float("nan"))]
    assert worst_case_curve(points, "acc", higher_is_better=True) == [(0, 0.2, 1e-4)]
    assert worst_case_curve([], "acc", higher_is_better=True) == []


def test_worst_case_goes_over_any_points_and_breaks_ties_by_point_order():
    """Points of any attack (not only learning rates): the attacker's best per step, ties to
    the smallest point, numbers compared by value (bits 4 < bits 16, not as text)."""
    rows = [{"point": {"bits": 16}, "step": 1, "metrics": {"acc": 0.5}},
            {"point": {"bits": 4}, "step": 1, "metrics": {"acc": 0.5}},
            {"point": {"bits": 8}, "step": 1, "metrics": {"acc": 0.2}}]
    for seed in range(4):
        random.Random(seed).shuffle(rows)
        assert worst_case(rows, "acc", higher_is_better=True) == [(1, 0.5, {"bits": 4})]
        assert worst_case(rows, "acc", higher_is_better=False) == [(1, 0.2, {"bits": 8})]
    assert worst_case_curve(rows, "acc", higher_is_better=False)[0][:2] == (1, 0.2)
    assert math.isnan(worst_case_curve(rows, "acc", higher_is_better=False)[0][2])  # no learning rate


def test_attacks_with_arbitrary_points_record_side_by_side(tmp_path):
    """One model, several attacks whose points are not learning rates: each is its own curve;
    an empty point (a one-run attack) records too; re-recording replaces."""
    store = ResultStore(tmp_path / "r.sqlite")
    store.record_attack("m", {"bits": 8}, 1, {"acc": 0.3}, attack="quantize")
    store.record_attack("m", {"bits": 4}, 1, {"acc": 0.6}, attack="quantize")
    store.record_attack("m", {}, 0, {"acc": 0.1}, attack="fewshot")
    store.record_attack("m", {}, 16, {"acc": 0.4}, attack="fewshot")
    store.record_attack("m", {"lr": 1e-3}, 10, {"acc": 0.9})
    store.record_attack("m", {"bits": 4}, 1, {"acc": 0.65}, attack="quantize")
    assert [(p["point"], p["lr"], p["metrics"]["acc"]) for p in store.attack_points("m", attack="quantize")] == [
        ({"bits": 4}, None, 0.65), ({"bits": 8}, None, 0.3)]
    assert [(p["point"], p["step"]) for p in store.attack_points("m", attack="fewshot")] == [({}, 0), ({}, 16)]
    assert [p["lr"] for p in store.attack_points("m")] == [1e-3]
    assert store.attacks() == ["quantize", "fewshot", "relearn"]


def fill(store):
    store.record_model("base", "base", {"forget_acc": 0.9, "retain_acc": 0.95}, 1e12, 10.0, {"steps": 100})
    store.record_model("maxent", "method", {"forget_acc": 0.1, "retain_acc": 0.9}, 1e10, 2.5,
                       {"method": "maxent", "flops_total": 1.01e12})
    store.record_attack("maxent", 1e-3, 0, {"forget_acc": 0.1})
    store.record_attack("maxent", 1e-4, 10, {"forget_acc": 0.3})
    store.record_attack("maxent", 1e-4, 0, {"forget_acc": 0.1})
    store.record_stage_time("pretrain/base", 12.5, cached=False)
    store.record_stage_time("unlearn/maxent", 0.01, cached=True)


def test_store_round_trip_and_reopen(tmp_path):
    path = tmp_path / "nested" / "results.sqlite"
    fill(ResultStore(path))
    store = ResultStore(path)  # reopen: the schema is created only if missing
    assert store.models() == [
        {"name": "base", "seed": 0, "kind": "base", "metrics": {"forget_acc": 0.9, "retain_acc": 0.95}, "flops": 1e12,
         "wall_seconds": 10.0, "meta": {"steps": 100}},
        {"name": "maxent", "seed": 0, "kind": "method", "metrics": {"forget_acc": 0.1, "retain_acc": 0.9}, "flops": 1e10,
         "wall_seconds": 2.5, "meta": {"method": "maxent", "flops_total": 1.01e12}},
    ]
    # ordered by lr, then step
    assert store.attack_points("maxent") == [
        {"point": {"lr": 1e-4}, "lr": 1e-4, "step": 0, "metrics": {"forget_acc": 0.1}, "seed": 0, "attack_seed": 0},
        {"point": {"lr": 1e-4}, "lr": 1e-4, "step": 10, "metrics": {"forget_acc": 0.3}, "seed": 0, "attack_seed": 0},
        {"point": {"lr": 1e-3}, "lr": 1e-3, "step": 0, "metrics": {"forget_acc": 0.1}, "seed": 0, "attack_seed": 0},
    ]
    assert store.attack_points("nobody") == []
    assert store.stage_times() == [{"stage": "pretrain/base", "seconds": 12.5, "cached": False},
                                   {"stage": "unlearn/maxent", "seconds": 0.01, "cached": True}]


def test_re_recording_replaces_rows_and_keeps_order(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    fill(store)
    fill(store)  # a resumed run records the same things again
    store.record_model("base", "base", {"forget_acc": 0.8}, 2e12, 11.0, {})
    store.record_attack("maxent", 1e-4, 10, {"forget_acc": 0.35})
    store.record_stage_time("pretrain/base", 0.02, cached=True)
    models = store.models()
    assert [m["name"] for m in models] == ["base", "maxent"]
    assert models[0]["metrics"] == {"forget_acc": 0.8} and models[0]["flops"] == 2e12 and models[0]["meta"] == {}
    assert len(store.attack_points("maxent")) == 3
    assert store.attack_points("maxent")[1]["metrics"] == {"forget_acc": 0.35}
    assert store.stage_times()[0] == {"stage": "pretrain/base", "seconds": 0.02, "cached": True}
    con = sqlite3.connect(tmp_path / "r.sqlite")
    counts = [con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("models", "attack_points", "stage_times")]
    con.close()
    assert counts == [2, 3, 2]


def test_nan_metrics_survive_the_round_trip(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.record_model("diverged", "method", {"forget_ce": float("nan")}, 0.0, 0.0, {})
    assert math.isnan(store.models()[0]["metrics"]["forget_ce"])


@pytest.mark.parametrize("call, match", [
    (lambda s: s.record_model("m", "teacher", {}, 0, 0, {}), "unknown kind 'teacher'"),
    (lambda s: s.record_model("", "base", {}, 0, 0, {}), "non-empty name"),
    (lambda s: s.record_model("m", "base", {"acc": "high"}, 0, 0, {}), "must be a number"),
    (lambda s: s.record_attack("m", 0.0, 1, {}), "learning rate must be a positive"),
    (lambda s: s.record_attack("m", 1e-3, -1, {}), "step must be an integer >= 0"),
    (lambda s: s.record_attack("m", 1e-3, 1.5, {}), "step must be an integer >= 0"),
    (lambda s: s.record_attack("m", {"lr": -1.0}, 1, {}), "learning rate must be a positive"),
    (lambda s: s.record_attack("m", ["bits", 4], 1, {}), "must be a mapping"),
    (lambda s: s.record_attack("m", {"bits": object()}, 1, {}), "JSON values"),
])
def test_bad_records_raise_one_clear_error(tmp_path, call, match):
    store = ResultStore(tmp_path / "r.sqlite")
    with pytest.raises(UndoError, match=match):
        call(store)
    assert store.models() == [] and store.attack_points("m") == []


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    junk = tmp_path / "results.sqlite"
    junk.write_text("this is not sqlite " * 100)
    with pytest.raises(UndoError, match="not a usable SQLite database"):
        ResultStore(junk)
    with pytest.raises(UndoError, match="is a directory"):
        ResultStore(tmp_path)


def test_rows_outside_the_declared_graph_are_hidden_and_models_follow_graph_order(tmp_path):
    """Rows of an earlier config stay in the file but no read returns them once the run
    declared its graph; a store without a declared graph returns every row."""
    store = ResultStore(tmp_path / "r.sqlite")
    store.record_model("undo_a0.8", "undo", {"forget_acc": 0.2}, 1.0, 1.0, {}, key="old")
    store.record_model("undo_a0.5", "undo", {"forget_acc": 0.3}, 1.0, 1.0, {}, key="k2")
    store.record_model("base", "base", {"forget_acc": 0.9}, 1.0, 1.0, {}, seed=1, key="k1")
    store.record_attack("base", 3e-3, 10, {"forget_acc": 0.5}, seed=1, key="oldattack")
    store.record_attack("base", 1e-3, 10, {"forget_acc": 0.4}, seed=1, key="a1")
    store.record_stage_time("seed1/attack/lr0.003", 1.0, False, key="oldattack")
    assert len(store.models()) == 3 and len(store.attack_points("base")) == 2
    store.set_graph(["k1", "k2", "a1"])
    assert [(m["name"], m["seed"]) for m in store.models()] == [("base", 1), ("undo_a0.5", 0)]
    assert [p["lr"] for p in store.attack_points("base")] == [1e-3]
    assert store.attack_points("base", seed=0) == [] and store.stage_times() == []


def test_a_store_of_an_older_layout_is_rebuilt(tmp_path):
    path = tmp_path / "r.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE models (name TEXT PRIMARY KEY, kind TEXT, metrics TEXT, flops REAL, "
                    "wall_seconds REAL, meta TEXT)")
        con.execute("INSERT INTO models VALUES ('base', 'base', '{}', 0, 0, '{}')")
    con.close()
    store = ResultStore(path)
    assert store.models() == []
    store.record_model("base", "base", {"forget_acc": 0.9}, 1.0, 1.0, {}, seed=2)
    assert store.models()[0]["seed"] == 2


def test_running_worst_keeps_the_attackers_best_checkpoint():
    """Robustness at step k is the best over every step <= k, with the point that reached it."""
    from undo.store import running_worst
    curve = [(0, 0.1, 1e-3), (10, 0.6, 1e-2), (20, 0.4, 1e-3), (30, 0.6, 1e-3), (40, 0.7, 1e-4)]
    assert running_worst(curve, higher_is_better=True) == [
        (0, 0.1, 1e-3), (10, 0.6, 1e-2), (20, 0.6, 1e-2), (30, 0.6, 1e-2), (40, 0.7, 1e-4)]  # a tie keeps the earlier
    ce = [(0, 3.0, 1e-3), (10, 2.0, 1e-2), (20, 2.5, 1e-3)]
    assert running_worst(ce, higher_is_better=False) == [(0, 3.0, 1e-3), (10, 2.0, 1e-2), (20, 2.0, 1e-2)]
    assert running_worst([], higher_is_better=True) == []


def test_attacks_follow_the_graph_order_whatever_order_they_finished_in(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.record_attack("m", {}, 1, {"acc": 0.1}, attack="fewshot", key="k_fewshot")
    store.record_attack("m", {"lr": 1e-3}, 1, {"acc": 0.2}, key="k_relearn")
    assert store.attacks() == ["fewshot", "relearn"]  # no graph declared: recording order
    store.set_graph(["k_relearn", "k_fewshot"])
    assert store.attacks() == ["relearn", "fewshot"]
