import re

import pytest

from undo.errors import UndoError
from undo.report import attack_steps, model_colours, summarize, summary_text, write_report
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
    ("oracle-matching", "oracle_matching", 0.91, 0.2, 2e11, {}, {1e-3: [0.2, 0.5, 0.6, 0.7]}),
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
    # compute: flops_total / oracle pretraining FLOPs, falling back to the model's own flops
    assert rows["undo-a0.6"].compute == pytest.approx(1.51)
    assert rows["base"].compute == pytest.approx(1.2)
    assert rows["oracle-matching"].compute == pytest.approx(0.2)
    unattacked = rows["evil<script>"]
    assert unattacked.curve == [] and unattacked.forget_early is None and unattacked.forget_final is None


def test_lower_is_better_metrics_take_the_min(store):
    summary = summarize(store, {**TASK, "higher_is_better": False})
    rows = {r.name: r for r in summary.rows}
    assert rows["maxent"].forget_early == 0.5 and rows["maxent"].forget_final == 0.8


def test_report_writes_html_and_the_pngs_it_references(store, tmp_path):
    index = write_report(tmp_path / "run", store, TASK)
    assert index == tmp_path / "run" / "report" / "index.html"
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == ["compute.png", "pareto.png", "relearning.png"]
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
    assert sorted(p.name for p in index.parent.iterdir()) == ["compute.png", "index.html", "pareto.png", "relearning.png"]


def test_summary_text_has_a_row_per_model(store):
    text = summary_text(store, TASK)
    lines = text.splitlines()
    assert len(lines) == 3 + len(MODELS)  # title, header, rule, rows
    for line, (name, kind, *_) in zip(lines[3:], MODELS):
        assert line.split()[0] == name and line.split()[1] == kind
    maxent = next(line for line in lines if line.startswith("maxent"))
    assert maxent.split()[2:7] == ["0.900", "0.020", "0.600", "0.850", "1.210"]
    assert "worst forget_acc @10" in lines[1] and "worst forget_acc @40" in lines[1]


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
