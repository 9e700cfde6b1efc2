"""The task's own table: every model x the task's further metrics (`Task.report_metrics`), plus
what `Task.versus_oracle` computes against the oracle of the same graph seed (MUSE's PrivLeak,
TOFU's forget quality), each a list of values over graph seeds that the report summarises
(mean [min, max]). Rows are metrics and columns models: a task lists more metrics than a run
has models. Tasks without `report_metrics` (arithmetic, language) have no such table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional

from .errors import UndoError
from .store import ResultStore

Versus = Callable[[dict[str, float], dict[str, float]], dict[str, float]]


@dataclasses.dataclass
class TaskTable:
    metrics: list[str]                             # row order: the task's keys, then the oracle-relative ones
    models: list[str]                              # column order: the run's
    cells: dict[tuple[str, str], list[float]]      # (metric, model) -> one value per graph seed


def _versus(task_name: str) -> Optional[Versus]:
    from .tasks import task_class

    try:
        return task_class(task_name).versus_oracle
    except UndoError:  # a run of a task no longer registered: its own metrics only
        return None


def _joined(metrics: dict[str, float], oracle: Optional[dict[str, float]], versus: Optional[Versus]) -> dict[str, float]:
    """The oracle-relative metrics of one model (none without an oracle row or when they cannot be made)."""
    if oracle is None or versus is None:
        return {}
    try:
        return versus(metrics, oracle)
    except UndoError:  # e.g. an oracle AUC of 0: PrivLeak is undefined, the cell stays empty
        return {}


def task_table(store: ResultStore, task: dict[str, Any]) -> TaskTable:
    keys = list(task.get("report_metrics") or [])
    if not keys:
        return TaskTable([], [], {})
    versus = _versus(str(task["name"]))
    models = store.models()
    oracles = {m.get("seed", 0): m["metrics"] for m in models if m["kind"] == "oracle"}
    cells: dict[tuple[str, str], list[float]] = {}
    extra: list[str] = []
    for m in models:
        joined = _joined(m["metrics"], oracles.get(m.get("seed", 0)), versus)
        extra += [k for k in joined if k not in extra and k not in keys]
        for key, value in {**m["metrics"], **joined}.items():
            if (key in keys or key in joined) and value is not None and math.isfinite(value):
                cells.setdefault((key, m["name"]), []).append(float(value))
    names = list(dict.fromkeys(m["name"] for m in models))
    present = [k for k in keys + extra if any((k, n) in cells for n in names)]
    return TaskTable(present, names, cells)


def task_table_rows(table: TaskTable, fmt: Callable[[list[float]], str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per metric, one column per model; `fmt` turns a cell's values
    (one per graph seed) into text."""
    header = ["metric", *table.models]
    body = [[metric, *(fmt(table.cells.get((metric, name), [])) for name in table.models)] for metric in table.metrics]
    return header, body
