import math
import re

import pytest

from undo.errors import UndoError
from undo.report import (attack_curve, attack_steps, format_spread, model_colours, model_table, plot_relearning,
                         render_html, spread, summarize, summary_text, write_report)
from undo.store import ResultStore

TASK = {"name": "arithmetic", "forget_metric": "forget_acc", "retain_metric": "retain_acc",
        "higher_is_better": True, "metric_label": "exact-match accuracy", "oracle_pretrain_flops": 1e12}

# (name, kind, retain, forget, flops, meta, {lr: [forget_acc at steps 0, 10, 20, 40]} or None)
MODELS = [
    ("base", "base", 0.95, 0.90, 1.2e12, {}, {1e-4: [0.9, 0.9, 0.9, 0.9], 1e-3: [0.9, 0.92, 0.93, 0.95]}),
    ("oracle", "oracle", 0.94, 0.05, 1e12, {}, {1e-4: [0.05, 0.06, 0.08, 0.1], 1e-3: [0.05, 0.1, 0.2, 0.3]}),
    ("maxent", "method", 0.90, 0.02, 1e10, {"method": "maxent", "flops_total": 1.21e12},
     {1e-4: [0.02, 0.5, 0.7, 0.8], 1e-3: [0.02, 0.6, 0.65, 0.85]}),
    ("evil<script>", "method", 0.80, 0.10, 1e10, {"method": "rmu"}, None),  # never attacked
    ("undo-a0.6", "undo", 0.92, 0.03, 3e11, {"alpha": 0.6, "teacher": "maxent", "flops_total": 1.51e12},
     {1e-4: [0.03, 0.1, 0.15, 0.2], 1e-3: [0.03, 0.12, 0.25, 0.35]}),
    ("undo-a0.3", "undo", 0.93, 0.03, 1e11, {"alpha": 0.3, "teacher": "maxent", "flops_total": 1.31e12},
     {1e-4: [0.03, 0.2, 0.3, 0.4], 1e-3: [0.03, 0.3, 0.4, 0.5]}),
    # falls back after step 20: the attacker keeps its best checkpoint (0.7)
    ("oracle-matching", "oracle_matching", 0.91, 0.2, 2e11, {}, {1e-3: [0.2, 0.5, 0.7, 0.6]}),
    ("unlearn-distill", "unlearn_distill", 0.9, 0.03, 2e11, {"teacher": "maxent"}, {1e-3: [0.03, 0.6, 0.7, 0.8]}),
]
STEPS = [0, 10, 20, 40]


@pytest.fixture
def store(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    for name, kind, retain, forget, flops, meta, curves in MODELS:
        store.record_model(name, kind, {"retain_acc": retain, "forget_acc": forget}, flops, 1.5, meta)
        for lr, values in (curves or {}).items():
            for step, value in zip(STEPS, values):
                store.record_attack(name, lr, step, {"forget_acc": value, "retain_acc": retain})
    store.record_stage_time("pretrain/base", 12.0, cached=False)
    store.record_stage_time("pretrain/oracle", 0.01, cached=True)
    return store


def test_attack_steps_picks_final_and_first_step_past_the_early_fraction():
    curves = [[(0, 0.1, 1e-3), (10, 0.2, 1e-3), (20, 0.3, 1e-3), (40, 0.4, 1e-3)], []]
    assert attack_steps(curves, 0.25) == (10, 40)   # 0.25 * 40 = 10
    assert attack_steps(curves, 0.3) == (20, 40)    # first step >= 12
    assert attack_steps(curves, 0.0) == (10, 40)    # step 0 is "before", never the early point
    assert attack_steps([[], []], 0.25) == (None, None)


def test_summary_rows_match_hand_computed_worst_cases(store):
    summary = summarize(store, TASK)
    assert (summary.early_step, summary.final_step) == (10, 40)
    rows = {r.name: r for r in summary.rows}
    assert [r.name for r in summary.rows] == [m[0] for m in MODELS]
    # worst case = max over the two lrs (accuracy: higher means the attacker recovered more)
    assert rows["maxent"].forget_early == 0.6 and rows["maxent"].forget_final == 0.85
    assert rows["undo-a0.6"].forget_early == 0.12 and rows["undo-a0.6"].forget_final == 0.35
    assert rows["base"].forget_final == 0.95 and rows["oracle"].forget_final == 0.3
    assert rows["maxent"].retain_before == 0.90 and rows["maxent"].forget_before == 0.02
    # worst case over steps <= k too: 0.7 at step 20 is kept at step 40 (where it reads 0.6)
    assert rows["oracle-matching"].forget_final == 0.7
    # compute: flops_total / oracle pretraining FLOPs, falling back to the model's own flops
    assert rows["undo-a0.6"].compute == pytest.approx(1.51)
    assert rows["base"].compute == pytest.approx(1.2)
    assert rows["oracle-matching"].compute == pytest.approx(0.2)
    unattacked = rows["evil<script>"]
    assert unattacked.curve == [] and unattacked.forget_early is None and unattacked.forget_final is None


def test_lower_is_better_metrics_take_the_running_min(tmp_path):
    """Cross-entropy: the attacker's best is the lowest CE over lrs and over steps <= k."""
    store = ResultStore(tmp_path / "ce.sqlite")
    store.record_model("m", "method", {"forget_ce": 3.0, "retain_ce": 1.0}, 1.0, 1.0, {})
    for lr, values in {1e-4: [3.0, 2.5, 2.9, 2.6], 1e-3: [3.0, 2.7, 2.4, 2.8]}.items():
        for step, value in zip(STEPS, values):
            store.record_attack("m", lr, step, {"forget_ce": value})
    task = {**TASK, "forget_metric": "forget_ce", "retain_metric": "retain_ce", "higher_is_better": False}
    row = summarize(store, task).rows[0]
    # per step min: 3.0, 2.5, 2.4, 2.6; running min: 3.0, 2.5, 2.4, 2.4
    assert [(s, v) for s, v, _ in row.curve] == [(0, 3.0), (10, 2.5), (20, 2.4), (40, 2.4)]
    assert row.curve[-1][2] == 1e-3  # the lr that reached the kept checkpoint
    assert row.forget_early == 2.5 and row.forget_final == 2.4


def test_report_writes_html_and_the_pngs_it_references(store, tmp_path):
    index = write_report(tmp_path / "run", store, TASK)
    assert index == tmp_path / "run" / "report" / "index.html"
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == ["attacks.png", "compute.png", "pareto.png", "relearning.png"]  # attacks: the matrix
    for image in images:
        data = (index.parent / image).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    for name, *_ in MODELS:
        assert name.replace("<", "&lt;").replace(">", "&gt;") in page
    assert "<script>" not in page  # names are escaped
    assert "No attack points for: evil&lt;script&gt;" in page
    assert "pretrain/oracle" in page and "0.850" in page  # stage table; maxent's worst case at step 40
    assert not list(index.parent.glob("*.tmp"))
    write_report(tmp_path / "run", store, TASK)  # rewriting replaces the files in place
    assert sorted(p.name for p in index.parent.iterdir()) == ["attacks.png", "compute.png", "index.html", "pareto.png",
                                                             "relearning.png"]


def test_summary_text_has_a_row_per_model(store):
    text = summary_text(store, TASK)
    lines = text.split("\n\n")[0].splitlines()  # the attack matrix follows after a blank line
    assert len(lines) == 3 + len(MODELS)  # title, header, rule, rows
    for line, (name, kind, *_) in zip(lines[3:], MODELS):
        assert line.split()[0] == name and line.split()[1] == kind
    maxent = next(line for line in lines if line.startswith("maxent"))
    # retain, forget before, worst @10, worst @40, own FLOPs, cumulative / oracle, distill (none), recovered (none)
    assert maxent.split()[2:10] == ["0.900", "0.020", "0.600", "0.850", "1e+10", "1.210", "-", "-"]
    assert "worst forget_acc @10" in lines[1] and "worst forget_acc @40" in lines[1]


def test_a_run_without_attacks_has_no_worst_case_columns(tmp_path, store):
    assert "worst forget_acc @10" in summary_text(store, TASK)
    unattacked = ResultStore(tmp_path / "unattacked.sqlite")
    unattacked.record_model("base", "base", {"retain_acc": 0.9, "forget_acc": 0.8}, 1e10, 1.0, {})
    header, body = model_table(summarize(unattacked, TASK))
    assert not any(h.startswith("worst") for h in header) and len(body[0]) == len(header)
    assert "@None" not in summary_text(unattacked, TASK)


def test_empty_store_still_gives_a_report(tmp_path):
    store = ResultStore(tmp_path / "empty.sqlite")
    index = write_report(tmp_path / "run", store, {**TASK, "oracle_pretrain_flops": None})
    assert "No models recorded" in index.read_text()
    assert all((index.parent / p).stat().st_size > 0 for p in ["relearning.png", "pareto.png", "compute.png"])
    assert "(no models recorded)" in summary_text(store, TASK)


def test_colours_base_red_oracle_green_undo_blue_ramp(store):
    colours = model_colours(summarize(store, TASK).rows)
    assert colours["base"] == "#d62728" and colours["oracle"] == "#2ca02c"
    low, high = colours["undo-a0.3"], colours["undo-a0.6"]
    assert low[2] > low[0] and high[2] > high[0]  # blue dominates
    assert sum(high[:3]) < sum(low[:3])           # larger alpha is darker
    assert colours["maxent"] != colours["evil<script>"]


def test_task_without_metric_names_is_a_clear_error(store):
    with pytest.raises(UndoError, match="lacks forget_metric"):
        summary_text(store, {"name": "x", "retain_metric": "retain_acc", "higher_is_better": True})


# --- spreads over graph seeds --------------------------------------------------------------
def test_spread_of_three_numbers_has_a_student_t_interval():
    s = spread([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    assert (s.mean, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.ci == pytest.approx(2.484138, abs=1e-6)
    assert s.interval() == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)


def test_spread_below_three_seeds_is_min_max_only_and_ignores_missing_values():
    two = spread([0.4, None, 0.6, math.nan])
    assert (two.mean, two.low, two.high, two.n, two.ci) == (pytest.approx(0.5), 0.4, 0.6, 2, None)
    assert two.interval() == (0.4, 0.6)
    one = spread([0.7])
    assert one.interval() == (0.7, 0.7) and one.ci is None
    assert spread([None, math.nan]) is None
    assert format_spread(one) == "0.700" and format_spread(two) == "0.500 [0.400, 0.600]"
    # 0.4, 0.5, 0.6: sd 0.1 -> 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert format_spread(spread([0.4, 0.5, 0.6])) == "0.500 [0.400, 0.600] ±0.248"
    assert format_spread(None) == "-"


def test_attack_curve_takes_running_worst_per_attack_seed_then_the_mean():
    def p(attack_seed, lr, step, acc):
        return {"lr": lr, "step": step, "metrics": {"acc": acc}, "attack_seed": attack_seed}
    points = [p(0, 1e-3, 0, 0.1), p(0, 1e-3, 10, 0.6), p(0, 1e-3, 20, 0.3),
              p(0, 1e-2, 0, 0.1), p(0, 1e-2, 10, 0.2), p(0, 1e-2, 20, 0.5),
              p(1, 1e-3, 0, 0.1), p(1, 1e-3, 10, 0.2), p(1, 1e-3, 20, 0.4)]
    # attack seed 0: per step max 0.1, 0.6, 0.5 -> running 0.1, 0.6, 0.6 (lr 1e-3 kept)
    # attack seed 1: 0.1, 0.2, 0.4 -> running 0.1, 0.2, 0.4; mean 0.1, 0.4, 0.5
    curve = attack_curve(points, "acc", higher_is_better=True)
    assert [s for s, _, _ in curve] == [0, 10, 20]
    assert [v for _, v, _ in curve] == pytest.approx([0.1, 0.4, 0.5])
    assert curve[1][2] == 1e-3 and curve[2][2] == 1e-3


def seeded_store(path):
    """Three graph seeds: base, an oracle whose pretraining cost differs by seed, and one UNDO model
    that recovered in two seeds (at different steps and costs) and never in the third."""
    store = ResultStore(path)
    forget = {0: [0.1, 0.3, 0.4], 1: [0.1, 0.5, 0.5], 2: [0.1, 0.4, 0.6]}  # at steps 0, 10, 20
    recovered = {0: (50, 2e11), 1: (75, 3e11), 2: None}
    for seed in (0, 1, 2):
        oracle_flops = 1e12 * (seed + 1)
        store.record_model("oracle", "oracle", {"retain_acc": 0.9, "forget_acc": 0.05}, oracle_flops, 1.0,
                           {}, seed=seed)
        hit = recovered[seed]
        meta = {"alpha": 0.6, "flops_total": 2e12, "recovered": hit is not None,
                "recovered_step": hit[0] if hit else None, "recovered_flops": hit[1] if hit else None}
        store.record_model("undo_a0.6", "undo", {"retain_acc": 0.8 + 0.05 * seed, "forget_acc": 0.05}, 4e11, 1.0,
                           meta, seed=seed)
        for step, value in zip([0, 10, 20], forget[seed]):
            store.record_attack("undo_a0.6", 1e-3, step, {"forget_acc": value}, seed=seed)
    return store


def test_several_seeds_give_means_with_spreads_and_per_seed_compute(tmp_path):
    summary = summarize(seeded_store(tmp_path / "r.sqlite"), TASK)
    assert summary.seeds == [0, 1, 2]
    rows = {r.seed: r for r in summary.of("undo_a0.6")}
    # cumulative compute over the oracle's pretraining of the same seed: 2e12 / (1, 2, 3)e12
    assert [rows[s].compute for s in (0, 1, 2)] == pytest.approx([2.0, 1.0, 2 / 3])
    # the paper's measure: FLOPs up to recovery / oracle pretraining; none where it never recovered
    assert rows[0].distill_compute == pytest.approx(0.2) and rows[1].distill_compute == pytest.approx(0.15)
    assert rows[2].distill_compute is None and rows[2].recovered is False
    final = summary.spread("undo_a0.6", "forget_final")
    assert (final.mean, final.low, final.high) == (pytest.approx(0.5), 0.4, 0.6)
    header, body = model_table(summary)
    cells = dict(zip(header, body[1]))
    assert cells["seeds"] == "3" and cells["recovered at step"] == "2/3: 50, 75, no"
    assert cells["worst forget_acc @20"] == "0.500 [0.400, 0.600] ±0.248"
    assert cells["retain_acc before"] == "0.850 [0.800, 0.900] ±0.124"
    assert dict(zip(header, body[0]))["recovered at step"] == "-"  # the oracle is no distillation


def test_relearning_plot_draws_a_band_only_with_several_seeds(tmp_path, store):
    several = summarize(seeded_store(tmp_path / "r.sqlite"), TASK)
    fig = plot_relearning(several, model_colours(several.rows))
    assert len(fig.axes[0].collections) == 1  # undo_a0.6: a min-max band around its mean line
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.1) and band[:, 1].max() == pytest.approx(0.6)
    one = summarize(store, TASK)
    assert len(plot_relearning(one, model_colours(one.rows)).axes[0].collections) == 0


def test_report_page_defines_its_numbers(tmp_path):
    summary = summarize(seeded_store(tmp_path / "r.sqlite"), TASK)
    page = render_html(summary, [])
    text = " ".join(page.split())  # the definitions wrap lines in the HTML source
    for words in ("keeps its best checkpoint", "every evaluated step ≤ k", "95% Student-t interval",
                  "cumulative", "every point of the sweep", "distill to recovery", "recorded whether or not"):
        assert words in text, words
    assert "mean over 3 graph seeds" in page and "<h3>Each seed</h3>" in page


def test_the_task_table_joins_each_model_with_its_seeds_oracle(tmp_path):
    """Privacy: the task's metrics per model over graph seeds, and PrivLeak against the oracle of
    the same seed, (AUC_model - AUC_oracle) / AUC_oracle, by hand; keys no model has are left out."""
    from undo.task_table import task_table

    store = ResultStore(tmp_path / "results.sqlite")
    aucs = {("oracle", 0): 0.50, ("oracle", 1): 0.40, ("ku", 0): 0.55, ("ku", 1): 0.60}
    for (name, seed), auc in aucs.items():
        kind = "oracle" if name == "oracle" else "method"
        store.record_model(name, kind, {"forget_el10": 0.1 * seed, "retain_ma": 0.9, "mia_loss_auc": auc},
                           1e10, 1.0, {}, seed=seed)
    task = {**TASK, "name": "privacy", "forget_metric": "forget_el10", "retain_metric": "retain_ma",
            "report_metrics": ["forget_el10", "mia_loss_auc", "forget_exposure_r64"]}
    table = task_table(store, task)
    assert table.metrics == ["forget_el10", "mia_loss_auc", "privleak_loss"] and table.models == ["oracle", "ku"]
    assert table.cells[("privleak_loss", "ku")] == pytest.approx([0.55 / 0.50 - 1, 0.60 / 0.40 - 1])
    assert table.cells[("privleak_loss", "oracle")] == [0.0, 0.0]
    text = summary_text(store, task)
    assert "privacy metrics" in text and "privleak_loss" in text and "0.300 [0.100, 0.500]" in text
    assert "privleak_loss" not in summary_text(store, {**task, "report_metrics": []})


def test_the_attack_matrix_spreads_over_attack_seeds_when_the_run_has_one_graph_seed(tmp_path):
    """Per attack seed the attacker's best over runs and steps; one graph seed: the cell is the
    mean [min, max] of those; two graph seeds: of the per-graph-seed means (by hand)."""
    from undo.attack_matrix import attack_matrix, matrix_table

    store = ResultStore(tmp_path / "results.sqlite")
    store.record_model("base", "base", {"forget_acc": 0.9, "retain_acc": 0.9}, 1e10, 1.0, {})
    # attack seed 0: best 0.4 (lr 1e-3, step 10); attack seed 1: best 0.8 (lr 1e-4, step 20)
    for a_seed, lr, values in [(0, 1e-3, [0.1, 0.4, 0.3]), (0, 1e-4, [0.1, 0.2, 0.2]),
                               (1, 1e-3, [0.1, 0.5, 0.6]), (1, 1e-4, [0.1, 0.7, 0.8])]:
        for step, value in zip((0, 10, 20), values):
            store.record_attack("base", lr, step, {"forget_acc": value}, attack_seed=a_seed)
    matrix = attack_matrix(store, TASK)
    assert matrix.runs[("base", "relearn")] == [0.4, 0.8] and matrix.mean("base", "relearn") == pytest.approx(0.6)
    assert matrix_table(matrix, lambda v: format_spread(spread(v)))[1][0][-1] == "0.600 [0.400, 0.800]"
    assert "over its 2 attack seeds" in matrix.spread_label()
    store.record_model("base", "base", {"forget_acc": 0.9, "retain_acc": 0.9}, 1e10, 1.0, {}, seed=1)
    store.record_attack("base", 1e-3, 0, {"forget_acc": 0.2}, seed=1)
    matrix = attack_matrix(store, TASK)
    assert matrix.shown("base", "relearn") == [pytest.approx(0.6), 0.2] and "2 graph seeds" in matrix.spread_label()
