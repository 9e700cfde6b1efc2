"""The report: what a run proves, as plots, tables and one self-contained HTML page.

    <run_dir>/report/index.html      tables + the plots below (inline CSS, no JS, no network)
    <run_dir>/report/relearning.png  worst-case forget metric vs attack step, one line per model
    <run_dir>/report/pareto.png      retain (before the attack) vs worst-case forget after it
    <run_dir>/report/compute.png     worst-case forget after the attack vs compute

How the numbers are made (the page says it too, in `DEFINITIONS`):
- worst case: the attacker keeps its best checkpoint. At step k it is the best forget metric
  over learning rates and over every step <= k (`store.running_worst`), per graph seed and
  attack seed; then the mean over attack seeds within the graph seed.
- spreads: every number is a mean over graph seeds, with [min, max], and with >= 3 seeds the
  half-width of the 95% Student-t interval (`spread`).
- compute: a model's own stage FLOPs; its cumulative FLOPs from scratch (every stage it
  depends on, sweep points and teachers included) as a fraction of the oracle's pretraining;
  for a distillation, the FLOPs up to the step its retain metric recovered, as that fraction.
Two points of the attack are reported: the final step and an early one (the first evaluated
step at or after `early_fraction` of the attack). Each file is written to a temporary name and
renamed into place, so an interrupted report never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import stats

from .attack_matrix import AttackMatrix, attack_matrix, matrix_note, matrix_table, plot_attack_matrix
from .errors import UndoError
from .store import ResultStore, running_worst, worst_case_curve
from .task_table import TaskTable, task_table, task_table_rows

PLOTS = {"relearning": "relearning.png", "pareto": "pareto.png", "compute": "compute.png", "attacks": "attacks.png"}

FIXED_COLOURS = {"base": "#d62728", "oracle": "#2ca02c", "oracle_matching": "#17becf", "unlearn_distill": "#7f7f7f"}
METHOD_COLOURS = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#000000"]


CI_LEVEL = 0.95
CI_MIN_SEEDS = 3            # below 3 seeds only [min, max] is shown (a 2-seed t-interval is +-12.7 sd)
DISTILLED = ("undo", "unlearn_distill")  # model kinds made by the distill stage (they have a stop rule)


@dataclasses.dataclass(frozen=True)
class Spread:
    """One number over graph seeds: the mean, [min, max], and with >= 3 seeds the half-width
    of the 95% Student-t interval (mean +- ci)."""

    mean: float
    low: float
    high: float
    n: int
    ci: Optional[float] = None

    def interval(self) -> tuple[float, float]:
        """The 95% interval when there is one, else [min, max] (one seed: the value itself)."""
        return (self.low, self.high) if self.ci is None else (self.mean - self.ci, self.mean + self.ci)


def _finite(*values: Optional[float]) -> bool:
    return all(v is not None and not isinstance(v, bool) and math.isfinite(v) for v in values)


def spread(values: list[Optional[float]]) -> Optional[Spread]:
    """The Spread of the finite values (None if there are none): t-interval half-width
    t(0.975, n-1) * sample standard deviation / sqrt(n)."""
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return None
    n, mean = len(finite), statistics.fmean(finite)
    ci = None
    if n >= CI_MIN_SEEDS:
        ci = float(stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1)) * statistics.stdev(finite) / math.sqrt(n)
    return Spread(mean, min(finite), max(finite), n, ci)


@dataclasses.dataclass
class ModelRow:
    """One model of one graph seed: a line of the per-seed table."""

    name: str
    seed: int
    kind: str
    setting: str                        # a compact view of meta (method, alpha, teacher, steps)
    retain_before: Optional[float]
    forget_before: Optional[float]
    forget_early: Optional[float]       # worst case at the early attack step
    forget_final: Optional[float]       # worst case at the final attack step
    flops: Optional[float]              # the model's own stage FLOPs
    flops_total: Optional[float]        # cumulative FLOPs from scratch (every stage it depends on)
    compute: Optional[float]            # flops_total / the oracle's pretraining FLOPs (or FLOPs without one)
    distill_compute: Optional[float]    # a distillation's FLOPs up to recovery, same unit; None if never
    recovered_step: Optional[int]       # a distillation: the first step its retain metric recovered
    recovered: Optional[bool]           # a distillation: whether it recovered (None: not a distillation)
    wall_seconds: float
    alpha: Optional[float]
    curve: list[tuple[int, float, float]]
    teacher: Optional[str] = None       # a distillation's teacher (the recipe UNDO followed)
    below_gate: bool = False            # a starting model that missed its task's quality gate (quality_gate_ok 0)


@dataclasses.dataclass
class Summary:
    task: dict[str, Any]
    rows: list[ModelRow]
    early_step: Optional[int]
    final_step: Optional[int]
    compute_label: str
    distill_label: str = "distill to recovery"

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.rows})

    def names(self) -> list[str]:
        return list(dict.fromkeys(r.name for r in self.rows))

    def of(self, name: str) -> list[ModelRow]:
        return [r for r in self.rows if r.name == name]

    def spread(self, name: str, field: str) -> Optional[Spread]:
        """`field` of model `name` over its graph seeds."""
        return spread([getattr(r, field) for r in self.of(name)])


def _check_task(task: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("forget_metric", "retain_metric", "higher_is_better") if k not in task]
    if missing:
        raise UndoError(f"report: the task description lacks {', '.join(missing)}; "
                        f"give name, forget_metric, retain_metric, higher_is_better, metric_label, oracle_pretrain_flops")
    return {"name": "task", "metric_label": task["forget_metric"], "oracle_pretrain_flops": None, **task}


def _value_from(curve: list[tuple[int, float, float]], step: Optional[int]) -> Optional[float]:
    """The worst-case value at the model's first evaluated step >= `step` (None if it never got there)."""
    if step is None:
        return None
    return next((value for s, value, _ in curve if s >= step), None)


def attack_steps(curves: list[list[tuple[int, float, float]]], early_fraction: float) -> tuple[Optional[int], Optional[int]]:
    """(early, final) attack steps over all curves: final is the last step any model reached;
    early is the first evaluated step >= early_fraction * final (after step 0)."""
    steps = sorted({s for curve in curves for s, _, _ in curve})
    if not steps:
        return None, None
    final = steps[-1]
    early = next((s for s in steps if s >= early_fraction * final and s > 0), final)
    return early, final


HIDDEN_META = ("flops_total", "recovered_flops")


def _setting(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in meta.items() if k not in HIDDEN_META and not isinstance(v, (dict, list)))


def attack_curve(points: list[dict[str, Any]], metric: str, higher_is_better: bool) -> list[tuple[int, float, float]]:
    """Robustness per attack step of one model of one graph seed. Per attack seed: the best the
    attacker reached over learning rates and over every step <= k (`running_worst`); then the
    mean over attack seeds at each step all of them reached (its lr: NaN when theirs differ)."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for point in points:
        by_seed.setdefault(point.get("attack_seed", 0), []).append(point)
    curves = [running_worst(worst_case_curve(group, metric, higher_is_better), higher_is_better)
              for group in by_seed.values()]
    if len(curves) <= 1:
        return curves[0] if curves else []
    steps = set.intersection(*({s for s, _, _ in c} for c in curves))
    out = []
    for step in sorted(steps):
        hits = [(v, lr) for c in curves for s, v, lr in c if s == step]
        lrs = {lr for _, lr in hits}
        out.append((step, sum(v for v, _ in hits) / len(hits), lrs.pop() if len(lrs) == 1 else math.nan))
    return out


def _fraction(flops: Optional[float], reference: Optional[float]) -> Optional[float]:
    if flops is None:
        return None
    return float(flops) / reference if reference else float(flops)


def _recovery_flops(model: dict[str, Any]) -> Optional[float]:
    """A distillation's FLOPs up to the step its retain metric recovered (None if it never did).
    Older records lack `recovered_flops`; they stopped at recovery, so their own FLOPs are it."""
    meta = model["meta"]
    if not meta.get("recovered"):
        return None
    return meta.get("recovered_flops", model["flops"])


def _row(model: dict[str, Any], curve: list[tuple[int, float, float]], task: dict[str, Any],
         steps: tuple[Optional[int], Optional[int]], reference: Optional[float]) -> ModelRow:
    meta, kind = model["meta"], model["kind"]
    alpha, distilled = meta.get("alpha"), kind in DISTILLED
    flops_total = meta.get("flops_total", model["flops"])
    return ModelRow(
        name=model["name"], seed=model.get("seed", 0), kind=kind, setting=_setting(meta),
        retain_before=model["metrics"].get(task["retain_metric"]),
        forget_before=model["metrics"].get(task["forget_metric"]),
        forget_early=_value_from(curve, steps[0]), forget_final=_value_from(curve, steps[1]),
        flops=model["flops"], flops_total=flops_total, compute=_fraction(flops_total, reference),
        distill_compute=_fraction(_recovery_flops(model), reference) if distilled else None,
        recovered_step=meta.get("recovered_step") if distilled else None,
        recovered=bool(meta.get("recovered")) if distilled else None,
        wall_seconds=model["wall_seconds"], alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
        curve=curve, teacher=meta.get("teacher"), below_gate=model["metrics"].get("quality_gate_ok") == 0)


def oracle_flops(models: list[dict[str, Any]], fallback: Optional[float]) -> dict[int, Optional[float]]:
    """The oracle's pretraining FLOPs per graph seed (the task's number where a seed has no oracle row)."""
    own = {m.get("seed", 0): m["flops"] for m in models if m["kind"] == "oracle" and m["flops"]}
    return {m.get("seed", 0): own.get(m.get("seed", 0), fallback) for m in models}


def summarize(store: ResultStore, task: dict[str, Any], early_fraction: float = 0.25) -> Summary:
    """Everything the tables and plots show, computed once from the store: a row per model and seed."""
    task = _check_task(task)
    models = store.models()
    higher = bool(task["higher_is_better"])
    curves = [attack_curve(store.attack_points(m["name"], seed=m.get("seed", 0)), task["forget_metric"], higher)
              for m in models]
    steps = attack_steps(curves, early_fraction)
    reference = oracle_flops(models, task["oracle_pretrain_flops"] or None)
    rows = [_row(m, c, task, steps, reference[m.get("seed", 0)]) for m, c in zip(models, curves)]
    per_oracle = any(reference.values())
    label = "cumulative compute (x oracle pretraining)" if per_oracle else "cumulative FLOPs"
    distill = "distill to recovery (x oracle pretraining)" if per_oracle else "distill FLOPs to recovery"
    return Summary(task, rows, steps[0], steps[1], label, distill)


def model_colours(rows: list[ModelRow]) -> dict[str, Any]:
    """Base red, oracle green, UNDO a blue ramp (darker = larger alpha), other kinds fixed,
    methods from a qualitative palette in the order they were recorded."""
    first: dict[str, ModelRow] = {}
    for row in rows:  # one colour per model, whatever its number of seeds
        first.setdefault(row.name, row)
    colours: dict[str, Any] = {}
    undo = sorted((r for r in first.values() if r.kind == "undo"), key=lambda r: (r.alpha is None, r.alpha or 0.0))
    for i, row in enumerate(undo):
        colours[row.name] = colormaps["Blues"](0.45 + 0.5 * (i / max(len(undo) - 1, 1)))
    methods = [r for r in first.values() if r.kind == "method"]
    for i, row in enumerate(methods):
        colours[row.name] = METHOD_COLOURS[i % len(METHOD_COLOURS)]
    for row in first.values():
        colours.setdefault(row.name, FIXED_COLOURS.get(row.kind, "#333333"))
    return colours


# --- plots ------------------------------------------------------------------------------
def _forget_label(task: dict[str, Any]) -> str:
    return f"{task['forget_metric']} ({task['metric_label']})"


def _direction(task: dict[str, Any]) -> str:
    return "lower = more robust" if task["higher_is_better"] else "higher = more robust"


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")


def curve_spread(rows: list[ModelRow]) -> list[tuple[int, Spread]]:
    """A model's robustness curve over its graph seeds: a Spread at every step all of them reached."""
    curves = [r.curve for r in rows if r.curve]
    if not curves:
        return []
    steps = set.intersection(*({s for s, _, _ in c} for c in curves))
    values = [{s: v for s, v, _ in c} for c in curves]
    return [(step, spread([v[step] for v in values])) for step in sorted(steps)]


def plot_relearning(summary: Summary, colours: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    drawn = 0
    for name in summary.names():  # the mean over seeds; several seeds: a band from min to max
        points = curve_spread(summary.of(name))
        if not points:
            continue
        kind = summary.of(name)[0].kind
        steps = [s for s, _ in points]
        ax.plot(steps, [p.mean for _, p in points], color=colours[name], label=name, marker=".",
                linewidth=2.5 if kind in ("base", "oracle") else 1.5,
                linestyle="--" if kind in ("oracle_matching", "unlearn_distill") else "-")
        if max(p.n for _, p in points) > 1:
            ax.fill_between(steps, [p.low for _, p in points], [p.high for _, p in points], color=colours[name],
                            alpha=0.15, linewidth=0)
        drawn += 1
    if drawn:  # outside the axes: a sweep can have many lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _no_data(ax, "no attack points recorded")
    ax.set_xlabel("relearning attack step")
    band = f"; mean over {len(summary.seeds)} seeds, band = min-max" if len(summary.seeds) > 1 else ""
    ax.set_ylabel(f"worst case over lr and steps <= k: {_forget_label(summary.task)}", fontsize=8)
    ax.set_title(f"{summary.task['name']}: relearning ({_direction(summary.task)}{band})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _spread_points(summary: Summary, x_field: str, y_field: str) -> list[tuple[str, Spread, Spread]]:
    """(name, x, y) of every model with both numbers, over its seeds."""
    out = []
    for name in summary.names():
        x, y = summary.spread(name, x_field), summary.spread(name, y_field)
        if x is not None and y is not None:
            out.append((name, x, y))
    return out


def _scatter_with_spread(ax: Any, points: list[tuple[str, Spread, Spread]], colours: dict[str, Any]) -> None:
    """Each model at its means, with min-max error bars when it has several seeds."""
    for name, x, y in points:
        xerr = [[x.mean - x.low], [x.high - x.mean]] if x.n > 1 else None
        yerr = [[y.mean - y.low], [y.high - y.mean]] if y.n > 1 else None
        ax.errorbar([x.mean], [y.mean], xerr=xerr, yerr=yerr, fmt="o", color=colours[name], markersize=5,
                    capsize=2, elinewidth=0.8, zorder=3)
        ax.annotate(name, (x.mean, y.mean), textcoords="offset points", xytext=(4, 3), fontsize=7)


def _bars_note(summary: Summary) -> str:
    return f" (mean over {len(summary.seeds)} seeds, bars = min-max)" if len(summary.seeds) > 1 else ""


def plot_pareto(summary: Summary, colours: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 4.5))
    panels = [("forget_early", summary.early_step), ("forget_final", summary.final_step)]
    for i, (field, step) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        points = _spread_points(summary, field, "retain_before")
        _scatter_with_spread(ax, points, colours)
        if not points:
            _no_data(ax, "no models with attack results")
        ax.set_xlabel(f"worst-case {summary.task['forget_metric']} after {step} steps ({_direction(summary.task)})",
                      fontsize=8)
        ax.set_ylabel(f"{summary.task['retain_metric']} before the attack", fontsize=8)
        ax.set_title(f"after {step} attack steps", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary.task['name']}: retain before vs forget after the attack{_bars_note(summary)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_compute(summary: Summary, colours: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    points = _spread_points(summary, "compute", "forget_final")
    kinds = {r.name: r.kind for r in summary.rows}
    undo = sorted((p for p in points if kinds[p[0]] == "undo"), key=lambda p: p[1].mean)
    if len(undo) > 1:  # the UNDO alphas as one trade-off line
        ax.plot([x.mean for _, x, _ in undo], [y.mean for _, _, y in undo], color=colormaps["Blues"](0.7),
                linewidth=1, zorder=2, label="UNDO (by alpha)")
        ax.legend(fontsize=7, loc="best")
    _scatter_with_spread(ax, points, colours)
    if not points:
        _no_data(ax, "no models with both compute and attack results")
    ax.set_xlabel(summary.compute_label)
    ax.set_ylabel(f"worst-case {summary.task['forget_metric']} after {summary.final_step} steps", fontsize=8)
    ax.set_title(f"robustness vs compute ({_direction(summary.task)}){_bars_note(summary)}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- tables -----------------------------------------------------------------------------
def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def format_spread(s: Optional[Spread]) -> str:
    """mean; several seeds: mean [min, max]; >= 3 seeds: mean [min, max] +-ci (95% t-interval half-width)."""
    if s is None:
        return "-"
    if s.n == 1:
        return _fmt(s.mean)
    text = f"{_fmt(s.mean)} [{_fmt(s.low)}, {_fmt(s.high)}]"
    return text + (f" ±{_fmt(s.ci)}" if s.ci is not None else "")


def _recovered_cell(rows: list[ModelRow]) -> str:
    """The step each seed's distillation recovered at ("no": never; "-": not a distillation)."""
    if all(r.recovered is None for r in rows):
        return "-"
    cells = [("-" if r.recovered is None else str(r.recovered_step) if r.recovered and r.recovered_step is not None
              else "yes" if r.recovered else "no") for r in rows]
    if len(rows) == 1:
        return cells[0]
    return f"{sum(bool(r.recovered) for r in rows)}/{len(rows)}: {', '.join(cells)}"


def _fields(summary: Summary) -> list[tuple[str, str]]:
    """The model tables' (field, header) columns; the worst-case ones only when an attack ran."""
    forget = summary.task["forget_metric"]
    fields = [("retain_before", f"{summary.task['retain_metric']} before"), ("forget_before", f"{forget} before"),
              ("forget_early", f"worst {forget} @{summary.early_step}"),
              ("forget_final", f"worst {forget} @{summary.final_step}"),
              ("flops", "own FLOPs"), ("compute", summary.compute_label), ("distill_compute", summary.distill_label)]
    if summary.early_step is None:
        fields = [f for f in fields if f[0] not in ("forget_early", "forget_final")]
    return fields


def model_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """One row per model over its graph seeds (one seed: its values)."""
    seeds = ["seeds"] if len(summary.seeds) > 1 else []
    fields = _fields(summary)
    header = ["model", "kind", *seeds, *(h for _, h in fields), "recovered at step"]
    body = []
    for name in summary.names():
        rows = summary.of(name)
        n = [str(len(rows))] if seeds else []
        body.append([name, rows[0].kind, *n, *(format_spread(summary.spread(name, f)) for f, _ in fields),
                     _recovered_cell(rows)])
    return header, body


def seed_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """One row per model and graph seed."""
    fields = _fields(summary)
    header = ["model", "seed", "kind", *(h for _, h in fields), "recovered at step", "wall s"]
    body = [[r.name, str(r.seed), r.kind, *(_fmt(getattr(r, f)) for f, _ in fields), _recovered_cell([r]),
             _fmt(r.wall_seconds, 1)] for r in summary.rows]
    return header, body


def _text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def spread_note(summary: Summary) -> str:
    n = len(summary.seeds)
    if n <= 1:
        return "one graph seed: no spread"
    ci = " ±half-width of the 95% Student-t interval" if n >= CI_MIN_SEEDS else ""
    return f"mean over {n} graph seeds [min, max]{ci}"


def gate_note(summary: Summary) -> str:
    """One line naming the starting models below their task's quality gate ("" when none)."""
    below = [f"{r.name} (seed {r.seed})" for r in summary.rows if r.below_gate]
    return (f"BELOW THE QUALITY GATE: {', '.join(below)}; every number of those seeds is void "
            f"(the model never learned the task well enough to unlearn it)") if below else ""


def summary_text(store: ResultStore, task: dict[str, Any], early_fraction: float = 0.25) -> str:
    """A short plain-text table for the terminal: one row per model, over its graph seeds."""
    summary = summarize(store, task, early_fraction)
    title = (f"{summary.task['name']}: {summary.task['forget_metric']} / {summary.task['retain_metric']} "
             f"({_direction(summary.task)}; worst case over attack learning rates and steps <= k; "
             f"{spread_note(summary)})")
    if not summary.rows:
        return f"{title}\n(no models recorded)"
    matrix = attack_matrix(store, summary.task)
    attacks = (f"\n\nattack matrix: recovered {matrix.metric}, the attacker's best over runs and steps "
               f"({matrix.spread_label()})\n{_text_table(*matrix_table(matrix, _cell))}") if matrix.attacks else ""
    table = task_table(store, summary.task)
    own = (f"\n\n{summary.task['name']} metrics ({spread_note(summary)})\n"
           f"{_text_table(*task_table_rows(table, _cell))}") if table.metrics else ""
    gate = f"\n{gate_note(summary)}" if gate_note(summary) else ""
    return f"{title}{gate}\n{_text_table(*model_table(summary))}{own}{attacks}"


def _cell(values: list[float]) -> str:
    return format_spread(spread(values))


def attack_matrix_html(matrix: Optional[AttackMatrix]) -> str:
    if matrix is None or not matrix.attacks:
        return ""
    return (f"<h2>Attack matrix</h2><p class='note'>{html.escape(matrix_note(matrix))}</p>"
            f"{_html_table(*matrix_table(matrix, _cell))}<img src=\"{PLOTS['attacks']}\" alt=\"attack matrix heatmap\">")


def task_table_html(table: Optional[TaskTable], task_name: str) -> str:
    if table is None or not table.metrics:
        return ""
    return (f"<h2>{html.escape(task_name)} metrics</h2><p class='note'>The task's further metrics before any "
            f"attack, mean [min, max] over graph seeds; privleak_* and forget_quality compare each model with "
            f"the oracle of its seed.</p>{_html_table(*task_table_rows(table, _cell))}")


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.note{color:#555;font-size:14px}"""


def definitions(summary: Summary) -> str:
    """What every number of the report means, as HTML (the one place these are defined for readers)."""
    task, esc = summary.task, html.escape
    best = "highest" if task["higher_is_better"] else "lowest"
    attack_seeds = len(task.get("attack_seeds") or [0])
    return f"""<h2>How to read the numbers</h2><ul class="note">
<li><b>Spreads.</b> Every number is the mean over the graph seeds (each seed replicates the whole
experiment: data, pretraining, unlearning, distillation, attacks). With several seeds, [min, max]
follows; with {CI_MIN_SEEDS} or more, ± the half-width of the 95% Student-t interval
(t<sub>0.975, n-1</sub> × sample standard deviation / √n). This run: {esc(spread_note(summary))}.</li>
<li><b>Worst case.</b> The attacker keeps its best checkpoint: robustness at attack step k is the
{best} {esc(task['forget_metric'])} the attack reached over its learning rates <i>and</i> over every
evaluated step ≤ k (step 0, the model before the attack, included), computed per graph seed and
attack seed, then averaged over the attack seeds of that graph seed ({attack_seeds} here), then
summarised over graph seeds ({esc(_direction(task))}).</li>
<li><b>Compute.</b> <i>own FLOPs</i>: the model's own stage; training counts 6 × non-embedding
parameters × tokens, a frozen model's forward pass (a teacher, a reference) 2 × parameters × tokens,
and extra passes are counted (SAM's second forward/backward, RepNoise's per-layer read-outs).
<i>cumulative</i>: the FLOPs of every stage the model depends on, from scratch: its pretraining, the
unlearning it continues, auxiliary models, a teacher's whole lineage, and every point of the sweep
its recipe was chosen from; over the oracle's pretraining FLOPs of the same seed.
<i>distill to recovery</i>: a distillation's own FLOPs (teacher forward passes included) up to
the step its retain metric recovered, over the oracle's pretraining FLOPs: the paper's compute
measure; "-" when it never recovered.</li>
<li><b>Recovered.</b> A distillation's retain metric has recovered at the first evaluation where it
is within the stop rule's tolerance of its teacher's (quick evaluation; absolute for accuracies,
relative for cross-entropies unless the experiment says otherwise). The step is recorded whether or
not training stopped there; "no": never within its step budget.</li></ul>"""


def render_html(summary: Summary, stages: list[dict[str, Any]], matrix: Optional[AttackMatrix] = None,
                table: Optional[TaskTable] = None) -> str:
    task = summary.task
    esc = html.escape
    missing = list(dict.fromkeys(r.name for r in summary.rows if not r.curve))
    models_table = _html_table(*model_table(summary)) if summary.rows else "<p class='note'>No models recorded.</p>"
    seeds_table = ("<h3>Each seed</h3>" + _html_table(*seed_table(summary))) if len(summary.seeds) > 1 else ""
    setting_table = _html_table(["model", "seed", "setting"], [[r.name, str(r.seed), r.setting or "-"]
                                                               for r in summary.rows])
    stage_table = _html_table(["stage", "seconds", "cached"],
                              [[s["stage"], _fmt(s["seconds"], 1), "yes" if s["cached"] else "no"] for s in stages]) \
        if stages else "<p class='note'>No stage times recorded.</p>"
    note = (f"<p class='note'>No attack points for: {esc(', '.join(missing))}.</p>" if missing else "")
    note += f"<p><b>{esc(gate_note(summary))}</b></p>" if gate_note(summary) else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>undo report: {esc(str(task['name']))}</title>
<style>{CSS}</style></head><body>
<h1>undo report: {esc(str(task['name']))}</h1>
<p class="note">Forget metric <b>{esc(task['forget_metric'])}</b>, retain metric <b>{esc(task['retain_metric'])}</b>
({esc(str(task['metric_label']))}); {esc(_direction(task))} after the attack.
Graph seeds: {esc(', '.join(map(str, summary.seeds)) or '-')} ({esc(spread_note(summary))}).
Early step: {summary.early_step}; final step: {summary.final_step}.</p>{note}
<h2>Models</h2>{models_table}{seeds_table}
{task_table_html(table, str(task['name']))}
{attack_matrix_html(matrix)}
{definitions(summary)}
<h2>Relearning curves</h2><img src="{PLOTS['relearning']}" alt="worst-case relearning curves">
<h2>Retain vs forget after the attack</h2><img src="{PLOTS['pareto']}" alt="Pareto plot">
<h2>Robustness vs compute</h2><img src="{PLOTS['compute']}" alt="robustness vs compute">
<h2>Settings</h2>{setting_table}
<h2>Stage times</h2>{stage_table}
</body></html>
"""


# --- writing ----------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_report(run_dir: Path, store: ResultStore, task: dict[str, Any], early_fraction: float = 0.25) -> Path:
    """Write run_dir/report/index.html and its PNG plots; returns the path of index.html."""
    summary = summarize(store, task, early_fraction)
    colours = model_colours(summary.rows)
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = {"relearning": plot_relearning, "pareto": plot_pareto, "compute": plot_compute}
    for key, plot in figures.items():
        _write_atomic(out / PLOTS[key], _png_bytes(plot(summary, colours)))
    matrix = attack_matrix(store, summary.task)
    if matrix.attacks:
        _write_atomic(out / PLOTS["attacks"], _png_bytes(plot_attack_matrix(matrix)))
    index = out / "index.html"
    html_text = render_html(summary, store.stage_times(), matrix, task_table(store, summary.task))
    _write_atomic(index, html_text.encode("utf-8"))
    return index
