"""The attack matrix: every model x every attack -> the forget score the attacker recovered.

A cell is, per graph seed, the attacker's best forget metric over the attack's runs (learning
rates, bit widths, ...) and every evaluated step (`store.worst_case`; step 0, the model before
the attack, counts where the attack records it: relearning, few-shot at k = 0), averaged over
attack seeds; the report then summarises the graph seeds (mean [min, max]). An attack may
show another metric of its curves (`Attack.matrix_metric`, e.g. a probe's accuracy).

The oracle (never saw the forget data) is the floor and the base model the ceiling: the
heatmap colours each cell by the share of the oracle-to-base gap the attack recovered under
the same attack (0 = as the oracle, 1 = as the base model), and writes the raw value on it.
Rows: base, oracle, then each model in the run's order with the UNDO variants that followed
it right after it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .errors import UndoError
from .store import ResultStore, worst_case


@dataclasses.dataclass
class AttackMatrix:
    metric: str                                   # the task's forget metric
    higher_is_better: bool
    models: list[tuple[str, str]]                 # (name, kind) in row order
    attacks: list[str]
    metrics: dict[str, str]                       # attack -> the curve metric its column shows
    cells: dict[tuple[str, str], list[float]]     # (model, attack) -> one value per graph seed
    before: dict[str, list[float]]                # model -> its forget metric before any attack, per graph seed
    runs: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)  # per graph x attack seed
    graph_seeds: int = 1

    def shown(self, model: str, attack: str) -> list[float]:
        """The values a cell's spread is over: one per graph seed; with one graph seed, one per
        attack seed (the only replication such a run has)."""
        return (self.cells if self.graph_seeds > 1 else self.runs).get((model, attack), [])

    def spread_label(self) -> str:
        seeds = max((len(v) for v in self.runs.values()), default=1)
        if self.graph_seeds > 1:
            return f"mean [min, max] over {self.graph_seeds} graph seeds of the attack-seed means"
        return f"one graph seed: mean [min, max] over its {seeds} attack seeds" if seeds > 1 else "one run: no spread"

    def mean(self, model: str, attack: str) -> Optional[float]:
        values = self.cells.get((model, attack)) or []
        return statistics.fmean(values) if values else None

    def recovered_share(self, model: str, attack: str) -> Optional[float]:
        """Where the cell lies between the oracle (0) and the base model (1) under this attack."""
        value, floor, ceiling = self.mean(model, attack), self.mean("oracle", attack), self.mean("base", attack)
        if value is None or floor is None or ceiling is None or math.isclose(floor, ceiling):
            return None
        return (value - floor) / (ceiling - floor)


def _matrix_metric(attack: str, metric: str, higher: bool) -> tuple[str, bool]:
    from .attacks import attack_class

    try:
        cls = attack_class(attack)
    except UndoError:  # an attack of an earlier run that is no longer registered: the task's metric
        return metric, higher
    own = getattr(cls, "matrix_metric", None)
    return (own, bool(getattr(cls, "matrix_higher_is_better", True))) if own else (metric, higher)


def _bests(points: list[dict[str, Any]], metric: str, higher: bool) -> list[float]:
    """Per attack seed the attacker's best over points and steps."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for p in points:
        by_seed.setdefault(p["attack_seed"], []).append(p)
    bests = []
    for rows in by_seed.values():
        values = [v for _, v, _ in worst_case(rows, metric, higher)]
        if values:
            bests.append(max(values) if higher else min(values))
    return [b for b in bests if math.isfinite(b)]


def _row_order(models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """base, oracle, then the rest in run order with each UNDO variant after the model it followed."""
    kinds = {m["name"]: m["kind"] for m in models}
    teacher = {m["name"]: m["meta"].get("teacher") for m in models}
    names = list(kinds)
    followers = {n for n in names if kinds[n] == "undo" and teacher[n] in kinds}
    order = [n for n in ("base", "oracle") if n in kinds]
    for name in names:
        if name in order or name in followers:
            continue
        order.append(name)
        order += [f for f in names if f in followers and teacher[f] == name]
    order += [n for n in names if n not in order]
    return [(n, kinds[n]) for n in order]


def attack_matrix(store: ResultStore, task: dict[str, Any]) -> AttackMatrix:
    """The matrix of the run's models (of the current graph) and every attack recorded."""
    metric, higher = task["forget_metric"], bool(task["higher_is_better"])
    models = store.models()
    attacks = store.attacks()
    metrics = {a: _matrix_metric(a, metric, higher) for a in attacks}
    cells: dict[tuple[str, str], list[float]] = {}
    runs: dict[tuple[str, str], list[float]] = {}
    before: dict[str, list[float]] = {}
    for m in models:
        value = m["metrics"].get(metric)
        if value is not None and math.isfinite(value):
            before.setdefault(m["name"], []).append(value)
        for attack in attacks:
            bests = _bests(store.attack_points(m["name"], seed=m["seed"], attack=attack), *metrics[attack])
            if bests:  # the cell of this graph seed: the mean over its attack seeds
                cells.setdefault((m["name"], attack), []).append(statistics.fmean(bests))
                runs.setdefault((m["name"], attack), []).extend(bests)
    return AttackMatrix(metric, higher, _row_order(models), attacks, {a: metrics[a][0] for a in attacks}, cells, before,
                        runs, len({m["seed"] for m in models}))


def matrix_table(matrix: AttackMatrix, fmt: Callable[[list[float]], str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, kind, the forget metric before, one column per attack; `fmt`
    turns a cell's values (`AttackMatrix.shown`) into text (the report's mean [min, max])."""
    def label(attack: str) -> str:
        own = matrix.metrics[attack]
        return attack if own == matrix.metric else f"{attack} ({own})"

    header = ["model", "kind", f"{matrix.metric} before", *map(label, matrix.attacks)]
    body = [[name, kind, fmt(matrix.before.get(name, [])), *(fmt(matrix.shown(name, a)) for a in matrix.attacks)]
            for name, kind in matrix.models]
    return header, body


def matrix_note(matrix: AttackMatrix) -> str:
    """What a cell means, in one paragraph (plain text)."""
    best = "highest" if matrix.higher_is_better else "lowest"
    return (f"Each cell: the {best} {matrix.metric} the attacker reached over the attack's runs (learning rates, "
            f"bit widths, ...) and evaluated steps, averaged over attack seeds, then over graph seeds "
            f"({matrix.spread_label()}). "
            f"heldout_relearn scores the half of the forget facts it did not train on. Attacks that record the "
            f"unattacked model (relearning's step 0, few-shot's k = 0) include it, so their cells never show less "
            f"than that (on the attack's own evaluation items, which may be the quick subset, so it can differ from "
            f"the 'before' column); quantize is the quantized model alone. The oracle (never saw the forget data) is "
            f"the floor, the base model the ceiling; the heatmap colours each cell by the share of that gap it "
            f"recovered under the same attack.")


def plot_attack_matrix(matrix: AttackMatrix) -> Figure:
    """Heatmap: colour = share of the oracle-to-base gap recovered (per attack), text = mean value."""
    rows, cols = [n for n, _ in matrix.models], matrix.attacks
    fig = Figure(figsize=(1.6 + 1.3 * max(len(cols), 1), 1.0 + 0.42 * max(len(rows), 1)))
    ax = fig.add_subplot()
    if not rows or not cols:
        ax.text(0.5, 0.5, "no attacks recorded", ha="center", va="center", transform=ax.transAxes, color="#666666")
        ax.set_axis_off()
        return fig
    share = [[matrix.recovered_share(r, c) for c in cols] for r in rows]
    grid = [[math.nan if s is None else min(max(s, 0.0), 1.0) for s in line] for line in share]
    cmap = colormaps["RdYlGn_r"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(np.array(grid, dtype=float)), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            value = matrix.mean(r, c)
            ax.text(j, i, "-" if value is None else f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(f"recovered {matrix.metric} (colour: 0 = oracle, 1 = base, per attack)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the oracle-to-base gap")
    fig.tight_layout()
    return fig
