"""The report: what a run proves, as plots, tables and one self-contained HTML page.

    <run_dir>/report/index.html      tables + the plots below (inline CSS, no JS, no network)
    <run_dir>/report/relearning.png  worst-case forget metric vs attack step, one line per model
    <run_dir>/report/pareto.png      retain (before the attack) vs worst-case forget after it
    <run_dir>/report/compute.png     worst-case forget after the attack vs compute

"Worst case" is the attacker's best over learning rates at each step (`store.worst_case_curve`).
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
from pathlib import Path
from typing import Any, Optional

from matplotlib import colormaps
from matplotlib.figure import Figure

from .errors import UndoError
from .store import ResultStore, worst_case_curve

PLOTS = {"relearning": "relearning.png", "pareto": "pareto.png", "compute": "compute.png"}

FIXED_COLOURS = {"base": "#d62728", "oracle": "#2ca02c", "oracle_matching": "#17becf", "unlearn_distill": "#7f7f7f"}
METHOD_COLOURS = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#000000"]


@dataclasses.dataclass
class ModelRow:
    """One model's line in every table and plot."""

    name: str
    seed: int
    kind: str
    setting: str                        # a compact view of meta (method, alpha, teacher, steps)
    retain_before: Optional[float]
    forget_before: Optional[float]
    forget_early: Optional[float]       # worst case at the early attack step
    forget_final: Optional[float]       # worst case at the final attack step
    compute: Optional[float]            # fraction of the oracle's pretraining FLOPs (or FLOPs)
    wall_seconds: float
    alpha: Optional[float]
    curve: list[tuple[int, float, float]]


@dataclasses.dataclass
class Summary:
    task: dict[str, Any]
    rows: list[ModelRow]
    early_step: Optional[int]
    final_step: Optional[int]
    compute_label: str

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.rows})


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


def _setting(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("flops_total",) and not isinstance(v, (dict, list)))


def _compute(model: dict[str, Any], oracle_flops: Optional[float]) -> Optional[float]:
    flops = model["meta"].get("flops_total", model["flops"])
    if flops is None:
        return None
    return float(flops) / oracle_flops if oracle_flops else float(flops)


def attack_curve(points: list[dict[str, Any]], metric: str, higher_is_better: bool) -> list[tuple[int, float, float]]:
    """The worst case over learning rates per attack seed, then the mean over attack seeds at
    each step every attack seed reached (the lr of a mean is NaN when the seeds' lrs differ)."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for point in points:
        by_seed.setdefault(point.get("attack_seed", 0), []).append(point)
    curves = [worst_case_curve(group, metric, higher_is_better) for group in by_seed.values()]
    if len(curves) <= 1:
        return curves[0] if curves else []
    steps = set.intersection(*({s for s, _, _ in c} for c in curves))
    out = []
    for step in sorted(steps):
        hits = [(v, lr) for c in curves for s, v, lr in c if s == step]
        lrs = {lr for _, lr in hits}
        out.append((step, sum(v for v, _ in hits) / len(hits), lrs.pop() if len(lrs) == 1 else math.nan))
    return out


def summarize(store: ResultStore, task: dict[str, Any], early_fraction: float = 0.25) -> Summary:
    """Everything the tables and plots show, computed once from the store: a row per model and seed."""
    task = _check_task(task)
    models = store.models()
    curves = [attack_curve(store.attack_points(m["name"], seed=m.get("seed", 0)), task["forget_metric"],
                           bool(task["higher_is_better"])) for m in models]
    early, final = attack_steps(curves, early_fraction)
    oracle_flops = task["oracle_pretrain_flops"] or None
    rows = []
    for model, curve in zip(models, curves):
        alpha = model["meta"].get("alpha")
        rows.append(ModelRow(
            name=model["name"], seed=model.get("seed", 0), kind=model["kind"], setting=_setting(model["meta"]),
            retain_before=model["metrics"].get(task["retain_metric"]),
            forget_before=model["metrics"].get(task["forget_metric"]),
            forget_early=_value_from(curve, early), forget_final=_value_from(curve, final),
            compute=_compute(model, oracle_flops), wall_seconds=model["wall_seconds"],
            alpha=float(alpha) if isinstance(alpha, (int, float)) else None, curve=curve))
    label = "compute (x oracle pretraining)" if oracle_flops else "compute (FLOPs)"
    return Summary(task, rows, early, final, label)


def model_colours(rows: list[ModelRow]) -> dict[str, Any]:
    """Base red, oracle green, UNDO a blue ramp (darker = larger alpha), other kinds fixed,
    methods from a qualitative palette in the order they were recorded."""
    colours: dict[str, Any] = {}
    undo = sorted((r for r in rows if r.kind == "undo"), key=lambda r: (r.alpha is None, r.alpha or 0.0))
    for i, row in enumerate(undo):
        colours[row.name] = colormaps["Blues"](0.45 + 0.5 * (i / max(len(undo) - 1, 1)))
    methods = [r for r in rows if r.kind == "method"]
    for i, row in enumerate(methods):
        colours[row.name] = METHOD_COLOURS[i % len(METHOD_COLOURS)]
    for row in rows:
        colours.setdefault(row.name, FIXED_COLOURS.get(row.kind, "#333333"))
    return colours


# --- plots ------------------------------------------------------------------------------
def _forget_label(task: dict[str, Any]) -> str:
    return f"{task['forget_metric']} ({task['metric_label']})"


def _direction(task: dict[str, Any]) -> str:
    return "lower = more robust" if task["higher_is_better"] else "higher = more robust"


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")


def plot_relearning(summary: Summary, colours: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    drawn, labelled = 0, set()
    for row in summary.rows:  # several seeds: one line each, in the model's colour, labelled once
        if not row.curve:
            continue
        steps = [s for s, _, _ in row.curve]
        values = [v for _, v, _ in row.curve]
        wide = row.kind in ("base", "oracle")
        label = None if row.name in labelled else row.name
        labelled.add(row.name)
        ax.plot(steps, values, color=colours[row.name], label=label, linewidth=2.5 if wide else 1.5,
                linestyle="--" if row.kind in ("oracle_matching", "unlearn_distill") else "-", marker=".")
        drawn += 1
    if drawn:  # outside the axes: a sweep can have many lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _no_data(ax, "no attack points recorded")
    ax.set_xlabel("relearning attack step")
    ax.set_ylabel(f"worst case over lr: {_forget_label(summary.task)}", fontsize=8)
    ax.set_title(f"{summary.task['name']}: relearning ({_direction(summary.task)})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _labelled_scatter(ax: Any, points: list[tuple[float, float, str, Any]]) -> None:
    for x, y, name, colour in points:
        ax.scatter([x], [y], color=colour, s=30, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)


def _finite(*values: Optional[float]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def plot_pareto(summary: Summary, colours: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 4.5))
    panels = [("forget_early", summary.early_step), ("forget_final", summary.final_step)]
    for i, (field, step) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        points = [(getattr(r, field), r.retain_before, r.name, colours[r.name]) for r in summary.rows
                  if _finite(getattr(r, field), r.retain_before)]
        _labelled_scatter(ax, points)
        if not points:
            _no_data(ax, "no models with attack results")
        ax.set_xlabel(f"worst-case {summary.task['forget_metric']} after {step} steps ({_direction(summary.task)})",
                      fontsize=8)
        ax.set_ylabel(f"{summary.task['retain_metric']} before the attack", fontsize=8)
        ax.set_title(f"after {step} attack steps", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary.task['name']}: retain before vs forget after the attack", fontsize=10)
    fig.tight_layout()
    return fig


def plot_compute(summary: Summary, colours: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    usable = [r for r in summary.rows if _finite(r.compute, r.forget_final)]
    undo = sorted((r for r in usable if r.kind == "undo"), key=lambda r: r.compute)
    if len(undo) > 1:  # the UNDO alphas as one trade-off line
        ax.plot([r.compute for r in undo], [r.forget_final for r in undo], color=colormaps["Blues"](0.7),
                linewidth=1, zorder=2, label="UNDO (by alpha)")
        ax.legend(fontsize=7, loc="best")
    _labelled_scatter(ax, [(r.compute, r.forget_final, r.name, colours[r.name]) for r in usable])
    if not usable:
        _no_data(ax, "no models with both compute and attack results")
    ax.set_xlabel(summary.compute_label)
    ax.set_ylabel(f"worst-case {summary.task['forget_metric']} after {summary.final_step} steps", fontsize=8)
    ax.set_title(f"robustness vs compute ({_direction(summary.task)})", fontsize=10)
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


def table_header(summary: Summary) -> list[str]:
    forget = summary.task["forget_metric"]
    seed = ["seed"] if len(summary.seeds) > 1 else []
    return ["model", *seed, "kind", f"{summary.task['retain_metric']} before", f"{forget} before",
            f"worst {forget} @{summary.early_step}", f"worst {forget} @{summary.final_step}",
            summary.compute_label, "wall s"]


def table_cells(row: ModelRow, summary: Summary) -> list[str]:
    seed = [str(row.seed)] if len(summary.seeds) > 1 else []
    return [row.name, *seed, row.kind, _fmt(row.retain_before), _fmt(row.forget_before), _fmt(row.forget_early),
            _fmt(row.forget_final), _fmt(row.compute), _fmt(row.wall_seconds, 1)]


def _text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _spread(values: list[Optional[float]]) -> str:
    """mean [min, max] of the finite values (one value: itself)."""
    finite = [v for v in values if _finite(v)]
    if not finite:
        return "-"
    mean = sum(finite) / len(finite)
    return _fmt(mean) if len(finite) == 1 else f"{_fmt(mean)} [{_fmt(min(finite))}, {_fmt(max(finite))}]"


def seed_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """One row per model over its seeds: mean [min, max] of the headline columns."""
    forget = summary.task["forget_metric"]
    header = ["model", "seeds", f"{summary.task['retain_metric']} before", f"{forget} before",
              f"worst {forget} @{summary.early_step}", f"worst {forget} @{summary.final_step}", summary.compute_label]
    body = []
    for name in dict.fromkeys(r.name for r in summary.rows):
        rows = [r for r in summary.rows if r.name == name]
        body.append([name, str(len(rows))] + [_spread([getattr(r, f) for r in rows]) for f in
                                              ("retain_before", "forget_before", "forget_early", "forget_final",
                                               "compute")])
    return header, body


def summary_text(store: ResultStore, task: dict[str, Any], early_fraction: float = 0.25) -> str:
    """A short plain-text table for the terminal: one row per model (and seed), worst case over
    lr; with several seeds, also mean [min, max] over them."""
    summary = summarize(store, task, early_fraction)
    title = (f"{summary.task['name']}: {summary.task['forget_metric']} / {summary.task['retain_metric']} "
             f"({_direction(summary.task)}; worst case over attack learning rates)")
    if not summary.rows:
        return f"{title}\n(no models recorded)"
    text = f"{title}\n{_text_table(table_header(summary), [table_cells(r, summary) for r in summary.rows])}"
    if len(summary.seeds) > 1:
        text += "\nover seeds: mean [min, max]\n" + _text_table(*seed_table(summary))
    return text


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.note{color:#555;font-size:14px}"""


def render_html(summary: Summary, stages: list[dict[str, Any]]) -> str:
    task = summary.task
    esc = html.escape
    missing = [r.name for r in summary.rows if not r.curve]
    rows_table = _html_table(table_header(summary), [table_cells(r, summary) for r in summary.rows]) if summary.rows \
        else "<p class='note'>No models recorded.</p>"
    seeds_table = (f"<p class='note'>Over {len(summary.seeds)} seeds: mean [min, max].</p>"
                   + _html_table(*seed_table(summary)) + "<p class='note'>Each seed:</p>") if len(summary.seeds) > 1 else ""
    setting_table = _html_table(["model", "seed", "setting"], [[r.name, str(r.seed), r.setting or "-"]
                                                               for r in summary.rows])
    stage_table = _html_table(["stage", "seconds", "cached"],
                              [[s["stage"], _fmt(s["seconds"], 1), "yes" if s["cached"] else "no"] for s in stages]) \
        if stages else "<p class='note'>No stage times recorded.</p>"
    note = (f"<p class='note'>No attack points for: {esc(', '.join(missing))}.</p>" if missing else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>undo report: {esc(str(task['name']))}</title>
<style>{CSS}</style></head><body>
<h1>undo report: {esc(str(task['name']))}</h1>
<p class="note">Forget metric <b>{esc(task['forget_metric'])}</b>, retain metric <b>{esc(task['retain_metric'])}</b>
({esc(str(task['metric_label']))}). Robustness is the worst case over the attack's learning rates: the best
forget performance any learning rate reaches after k steps ({esc(_direction(task))}); with several
attack seeds, the mean of that worst case over them. Seeds: {esc(', '.join(map(str, summary.seeds)) or '-')}
(one row per model and seed).
Early step: {summary.early_step}; final step: {summary.final_step}.</p>{note}
<h2>Models</h2>{seeds_table}{rows_table}
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
    index = out / "index.html"
    _write_atomic(index, render_html(summary, store.stage_times()).encode("utf-8"))
    return index
