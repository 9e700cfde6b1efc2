"""The results store: one SQLite file per run holding every model's scores, every point
of every attack curve, and how long each stage took.

    models        (name, seed) unique, kind, metrics, flops, wall_seconds, meta, key
    attack_points (model, seed, attack, attack_seed, point, step) unique, lr, metrics, key
    stage_times   stage (unique), seconds, cached
    graph         stage key: the keys of the current experiment's graph

Every write is an upsert, so a resumed run that records the same things again replaces
rows instead of duplicating them, and a re-recorded model keeps its place in the
insertion order. Rows carry their stage's cache key; once a run has declared its graph
(`set_graph`), reads return only rows of that graph, so results of an earlier config
(other learning rates, alphas, models) never leak into a table or a claim. The store is
an index of the run's artifacts: every stage records itself again when it is found in
the cache, so a store of an older layout is simply rebuilt. Each call opens, commits and
closes its own connection: a killed run leaves nothing half-written (SQLite transactions).

An attack point is the attack's run settings as a JSON mapping: {"lr": 1e-3} for relearning,
{"bits": 4} for quantization, {} for a one-run attack. It is stored as canonical JSON (sorted
keys), and its learning rate, if it has one, also in the `lr` column (NULL otherwise).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from .errors import UndoError


MODEL_KINDS = ("base", "oracle", "start", "method", "oracle_matching", "unlearn_distill", "undo", "sweep")
SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, seed INTEGER NOT NULL, kind TEXT NOT NULL, metrics TEXT NOT NULL,
    flops REAL NOT NULL, wall_seconds REAL NOT NULL, meta TEXT NOT NULL, key TEXT,
    PRIMARY KEY (name, seed));
CREATE TABLE IF NOT EXISTS attack_points (
    model TEXT NOT NULL, seed INTEGER NOT NULL, attack TEXT NOT NULL, attack_seed INTEGER NOT NULL,
    point TEXT NOT NULL, lr REAL, step INTEGER NOT NULL, metrics TEXT NOT NULL, key TEXT,
    PRIMARY KEY (model, seed, attack, attack_seed, point, step));
CREATE TABLE IF NOT EXISTS stage_times (
    stage TEXT PRIMARY KEY, seconds REAL NOT NULL, cached INTEGER NOT NULL, key TEXT);
CREATE TABLE IF NOT EXISTS graph (key TEXT PRIMARY KEY, position INTEGER NOT NULL);
"""

# Rows of the current graph only, once a graph was declared; every row otherwise.
CURRENT = "(key IN (SELECT key FROM graph) OR NOT EXISTS (SELECT 1 FROM graph))"


def _metrics_json(metrics: dict[str, float], where: str) -> str:
    if not isinstance(metrics, dict):
        raise UndoError(f"{where}: metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    try:
        clean = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError):
        raise UndoError(f"{where}: every metric must be a number, got {metrics!r}") from None
    return json.dumps(clean)  # NaN/inf are kept (json writes them as NaN/Infinity)


def _number(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UndoError(f"{where}: expected a number, got {value!r}") from None


def _point(point: Any, where: str) -> dict[str, Any]:
    """An attack point as a JSON mapping of setting -> value (a bare number is a learning rate)."""
    if isinstance(point, (int, float)) and not isinstance(point, bool):
        point = {"lr": point}
    if not isinstance(point, dict) or not all(isinstance(k, str) for k in point):
        raise UndoError(f"{where}: an attack point must be a mapping of setting name -> value, got {point!r}")
    try:
        point = json.loads(json.dumps(point))
    except (TypeError, ValueError):
        raise UndoError(f"{where}: an attack point must hold JSON values (numbers, text, lists), got {point!r}") from None
    if "lr" in point:
        lr = _number(point["lr"], f"{where} lr")
        if not (lr > 0 and math.isfinite(lr)):
            raise UndoError(f"{where}: learning rate must be a positive number, got {lr}")
        point["lr"] = lr
    return point


def point_order(point: dict[str, Any]) -> tuple:
    """A sort key for attack points: by setting name, numbers by value, other values as text."""
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, json.dumps(v)))
                 for k, v in sorted(point.items()))


class ResultStore:
    """A run's results database at `path` (created with its parent directories if missing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise UndoError(f"results store {self.path} is a directory; give a file path such as runs/NAME/results.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            if con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # an older layout: rebuilt
                con.executescript("DROP TABLE IF EXISTS models; DROP TABLE IF EXISTS attack_points; "
                                  "DROP TABLE IF EXISTS stage_times; DROP TABLE IF EXISTS graph;")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.executescript(SCHEMA)

    def set_graph(self, keys: Iterable[str]) -> None:
        """Declare the current graph (its stage keys in graph order): reads return only rows
        recorded with these keys, models in graph order (whatever order stages finished in)."""
        with self._connect() as con:
            con.execute("DELETE FROM graph")
            con.executemany("INSERT OR IGNORE INTO graph (key, position) VALUES (?, ?)",
                            [(k, i) for i, k in enumerate(keys)])

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as e:
            raise UndoError(f"cannot open results store {self.path}: {e}; check the path and its permissions") from None
        try:
            with con:  # commits on success, rolls back on error
                yield con
        except sqlite3.DatabaseError as e:
            raise UndoError(f"results store {self.path} is not a usable SQLite database ({e}); "
                            f"delete it or point to another file") from None
        finally:
            con.close()

    # --- models ---------------------------------------------------------------------------
    def record_model(self, name: str, kind: str, metrics: dict[str, float], flops: float,
                     wall_seconds: float, meta: dict, seed: int = 0, key: Optional[str] = None) -> None:
        where = f"results store, model '{name}'"
        if not isinstance(name, str) or not name:
            raise UndoError(f"results store: a model needs a non-empty name, got {name!r}")
        if kind not in MODEL_KINDS:
            raise UndoError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
        row = (name, int(seed), kind, _metrics_json(metrics, where), _number(flops, f"{where} flops"),
               _number(wall_seconds, f"{where} wall_seconds"), json.dumps(dict(meta or {}), default=str), key)
        with self._connect() as con:
            # ON CONFLICT ... UPDATE keeps the row's rowid, hence its place in the insertion order.
            con.execute("INSERT INTO models (name, seed, kind, metrics, flops, wall_seconds, meta, key) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name, seed) DO UPDATE SET kind=excluded.kind, "
                        "metrics=excluded.metrics, flops=excluded.flops, wall_seconds=excluded.wall_seconds, "
                        "meta=excluded.meta, key=excluded.key", row)

    def models(self) -> list[dict[str, Any]]:
        """Every model of the current graph in insertion order: {name, seed, kind, metrics, flops,
        wall_seconds, meta}."""
        with self._connect() as con:
            rows = con.execute("SELECT name, seed, kind, metrics, flops, wall_seconds, meta FROM models "
                               f"WHERE {CURRENT} ORDER BY (SELECT position FROM graph WHERE graph.key = models.key), "
                               "rowid").fetchall()
        return [{"name": n, "seed": s, "kind": k, "metrics": json.loads(m), "flops": f, "wall_seconds": w,
                 "meta": json.loads(meta)} for n, s, k, m, f, w, meta in rows]

    # --- attack curves -------------------------------------------------------------------
    def record_attack(self, model: str, point: "dict[str, Any] | float", step: int, metrics: dict[str, float],
                      seed: int = 0, attack: str = "relearn", attack_seed: int = 0, key: Optional[str] = None) -> None:
        """One point of an attack curve: `model` (of graph seed `seed`) attacked with the run
        `point` (a JSON mapping such as {"lr": 1e-3} or {"bits": 4}; a bare number is a learning
        rate) and attack seed `attack_seed`, evaluated after `step` steps (0 = before)."""
        where = f"results store, attack on '{model}'"
        point = _point(point, where)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UndoError(f"{where}: step must be an integer >= 0 (0 = before the attack), got {step!r}")
        with self._connect() as con:
            con.execute("INSERT INTO attack_points (model, seed, attack, attack_seed, point, lr, step, metrics, key) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model, seed, attack, attack_seed, point, step) "
                        "DO UPDATE SET lr=excluded.lr, metrics=excluded.metrics, key=excluded.key",
                        (model, int(seed), attack, int(attack_seed), json.dumps(point, sort_keys=True),
                         point.get("lr"), step, _metrics_json(metrics, where), key))

    def attack_points(self, model: str, seed: Optional[int] = None, attack: str = "relearn") -> list[dict[str, Any]]:
        """The points of `model`'s curves of `attack` (of one graph seed, or all), ordered by
        seed, attack seed, point (numbers by value), step: {point, lr, step, metrics, seed,
        attack_seed}; `lr` is the point's learning rate, or None."""
        where, args = "model = ? AND attack = ?", [model, attack]
        if seed is not None:
            where, args = where + " AND seed = ?", args + [int(seed)]
        with self._connect() as con:
            rows = con.execute(f"SELECT point, lr, step, metrics, seed, attack_seed FROM attack_points WHERE {where} "
                               f"AND {CURRENT}", args).fetchall()
        out = [{"point": json.loads(p), "lr": lr, "step": step, "metrics": json.loads(m), "seed": s, "attack_seed": a}
               for p, lr, step, m, s, a in rows]
        return sorted(out, key=lambda r: (r["seed"], r["attack_seed"], point_order(r["point"]), r["step"]))

    def attacks(self) -> list[str]:
        """The attacks with points in the current graph, in graph order (the experiment's
        `attacks:` list), else in the order they were first recorded."""
        with self._connect() as con:
            rows = con.execute(f"SELECT attack, MIN((SELECT position FROM graph WHERE graph.key = attack_points.key)), "
                               f"MIN(rowid) FROM attack_points WHERE {CURRENT} GROUP BY attack ORDER BY 2, 3").fetchall()
        return [a for a, _, _ in rows]

    # --- stage times ----------------------------------------------------------------------
    def record_stage_time(self, stage: str, seconds: float, cached: bool, key: Optional[str] = None) -> None:
        """How long `stage` took to compute (its own time, also when this run found it in the
        cache: then `cached` is true)."""
        with self._connect() as con:
            con.execute("INSERT INTO stage_times (stage, seconds, cached, key) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(stage) DO UPDATE SET seconds=excluded.seconds, cached=excluded.cached, "
                        "key=excluded.key",
                        (str(stage), _number(seconds, f"results store, stage '{stage}' seconds"), int(bool(cached)), key))

    def stage_times(self) -> list[dict[str, Any]]:
        """[{stage, seconds, cached}] of the current graph in the order stages were first recorded."""
        with self._connect() as con:
            rows = con.execute(f"SELECT stage, seconds, cached FROM stage_times WHERE {CURRENT} ORDER BY "
                               "(SELECT position FROM graph WHERE graph.key = stage_times.key), rowid").fetchall()
        return [{"stage": s, "seconds": sec, "cached": bool(c)} for s, sec, c in rows]


def worst_case(points: Iterable[dict[str, Any]], metric: str,
               higher_is_better: bool) -> list[tuple[int, float, dict[str, Any]]]:
    """The attacker's best `metric` at each step over the attack's points: [(step, value, point)].

    "Best for the attacker" is the max when higher values mean more capability
    (accuracy) and the min otherwise (cross-entropy). Points without the metric or with
    a NaN value are ignored; a step none of whose points has it is left out. Ties go to
    the smallest point (`point_order`: the smallest learning rate for relearning), so the
    answer does not depend on the order of `points`. A point without "point" but with
    "lr" (the older layout) counts as {"lr": lr}.
    """
    best: dict[int, tuple[float, dict[str, Any]]] = {}
    for row in points:
        value = row["metrics"].get(metric)
        if value is None or math.isnan(value):
            continue
        step = int(row["step"])
        point = row["point"] if row.get("point") is not None else {"lr": float(row["lr"])}
        if step not in best:
            best[step] = (value, point)
            continue
        old_value, old_point = best[step]
        better = value > old_value if higher_is_better else value < old_value
        if better or (value == old_value and point_order(point) < point_order(old_point)):
            best[step] = (value, point)
    return [(step, value, point) for step, (value, point) in sorted(best.items())]


def worst_case_curve(points: Iterable[dict[str, Any]], metric: str,
                     higher_is_better: bool) -> list[tuple[int, float, float]]:
    """`worst_case` with each step's point given by its learning rate: [(step, value, lr)]
    (NaN for a point without one), the relearning view."""
    return [(step, value, float(point.get("lr", math.nan))) for step, value, point in
            worst_case(points, metric, higher_is_better)]


def running_worst(curve: list[tuple[int, float, Any]], higher_is_better: bool) -> list[tuple[int, Any, Any]]:
    """The attacker keeps its best checkpoint: at each step k, the best value over every step
    <= k of a per-step worst case `curve` ([(step, value, point)]), with the point that reached
    it (the earliest step wins a tie). Step 0, the model before the attack, counts too."""
    out: list[tuple[int, Any, Any]] = []
    for step, value, point in curve:
        if out:
            best = out[-1][1]
            if not (value > best if higher_is_better else value < best):
                value, point = best, out[-1][2]
        out.append((step, value, point))
    return out
