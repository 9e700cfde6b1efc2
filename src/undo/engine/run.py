"""`undo run`: build the experiment's graph, run it with an executor, write the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import yaml

from .. import distributed
from ..config import to_dict
from ..errors import UndoError
from ..experiment import ExperimentConfig
from ..log import say
from ..report import summary_text, write_report
from ..store import ResultStore
from ..tasks import task_class
from .executors import RayOptions, run_in_process, run_on_ray
from .graph import Graph, build_graph


def task_info(graph: Graph, run_dir: Path) -> dict:
    """What the report needs to know of the task (headline metrics, the oracle's compute)."""
    exp = graph.exp
    cls = task_class(exp.task.name)
    oracle_flops = None
    oracle = graph.nodes.get(f"seed{exp.all_seeds()[0]}/oracle")
    if oracle is not None:
        result = json.loads((run_dir / oracle.id / "result.json").read_text())
        oracle_flops = result.get("flops")
    return {"name": cls.name, "forget_metric": cls.forget_metric, "retain_metric": cls.retain_metric,
            "higher_is_better": cls.higher_is_better, "metric_label": cls.metric_label,
            "oracle_pretrain_flops": oracle_flops, "seeds": exp.all_seeds(), "attack_seeds": exp.attack_seeds}


def stage_table(store: ResultStore, graph: Graph) -> str:
    rows = [r for r in store.stage_times() if r["stage"] in graph.nodes]
    width = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"{'stage':{width}s} {'seconds':>8s}"]
    lines += [f"{r['stage']:{width}s} {r['seconds']:8.1f}{'  (cached)' if r['cached'] else ''}" for r in rows]
    lines.append(f"{'total':{width}s} {sum(r['seconds'] for r in rows):8.1f}")
    return "\n".join(lines)


def run_experiment(exp: ExperimentConfig, run_dir: Path, executor: Literal["inprocess", "ray"] = "inprocess",
                   ray_options: Optional[RayOptions] = None) -> Path:
    """Every stage of the experiment's graph, then the results store and the report."""
    distributed.init()
    graph = build_graph(exp)
    main = distributed.is_main_process()  # several processes: all train, the main one records
    store = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
        store = ResultStore(run_dir / "results.sqlite")
        store.set_graph(node.key for node in graph.nodes.values())
    say(f"{exp.name}: {len(graph.nodes)} stages over seeds {exp.all_seeds()} (run `undo plan` to list them)")
    if executor == "ray":
        if distributed.world_size() > 1:
            raise UndoError("--executor ray runs stages in Ray workers; launch it without accelerate/torchrun")
        run_on_ray(graph, run_dir, ray_options or RayOptions())
    else:
        run_in_process(graph, run_dir, store)
    report = run_dir / "report" / "index.html"
    if main:
        info = task_info(graph, run_dir)
        (run_dir / "task.json").write_text(json.dumps(info))
        report = write_report(run_dir, store, info)
        print(summary_text(store, info))
        print(stage_table(store, graph))
        print(f"report: {report}")
    distributed.barrier()
    return report
