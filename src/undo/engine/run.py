"""`undo run`: build the experiment's graph, run it with an executor, write the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional

import yaml

from .. import distributed
from ..config import to_dict
from ..errors import UndoError, write_errors
from ..experiment import ExperimentConfig
from ..log import say
from ..report import summary_text, write_report
from ..store import ResultStore
from ..tasks import build_task, task_class
from .executors import RayOptions, run_in_pool, run_on_ray
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
            "oracle_pretrain_flops": oracle_flops, "seeds": exp.all_seeds(), "attack_seeds": exp.attack_seeds,
            "report_metrics": list(cls.report_metrics)}


def check_task_data(exp: ExperimentConfig) -> None:
    """Both training splits have examples, before any stage runs (an empty split would
    otherwise fail the first stage that trains on it, after the stages before it ran)."""
    task = build_task(exp.task, exp.seed)
    for domain in ("forget", "retain"):
        if not task.train_examples(domain):
            raise UndoError(f"task '{exp.task.name}': the {domain} split has no training examples; "
                            f"give task.options {domain} data")


def stage_table(store: ResultStore, graph: Graph) -> str:
    """Seconds per stage; the runs of one attack on one model (its points x attack seeds) on
    one line, `<seed>/attack/<attack>/<model> (N runs)`: a default run has 90 of them."""
    rows: dict[str, list] = {}
    for r in store.stage_times():
        node = graph.nodes.get(r["stage"])
        if node is None:
            continue
        label = r["stage"].rsplit("/", 1)[0] if node.kind == "attack" else r["stage"]
        row = rows.setdefault(label, [0.0, 0, True])
        row[0], row[1], row[2] = row[0] + r["seconds"], row[1] + 1, row[2] and bool(r["cached"])
    labels = {label: label + (f" ({n} runs)" if n > 1 else "") for label, (_, n, _) in rows.items()}
    width = max([len(text) for text in labels.values()] + [5])
    lines = [f"{'stage':{width}s} {'seconds':>8s}"]
    lines += [f"{labels[label]:{width}s} {seconds:8.1f}{'  (cached)' if cached else ''}"
              for label, (seconds, _, cached) in rows.items()]
    lines.append(f"{'total':{width}s} {sum(row[0] for row in rows.values()):8.1f}")
    return "\n".join(lines)


def write_report_safely(run_dir: Path, store: ResultStore, info: dict) -> Path:
    """`write_report`; a failed write (disk full, read-only) leaves no temporary file behind
    and ends as one UndoError naming the report's directory."""
    def remove_temporary_files() -> None:
        for tmp in (run_dir / "report").glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    with write_errors(run_dir / "report", "free disk space or make the run directory writable, then run "
                                          "`undo report RUN_DIR`", cleanup=remove_temporary_files):
        return write_report(run_dir, store, info)


def run_experiment(exp: ExperimentConfig, run_dir: Path, executor: Literal["local", "ray"] = "local",
                   ray_options: Optional[RayOptions] = None, jobs: int = 1) -> Path:
    """Every stage of the experiment's graph, then the results store and the report. `local`
    runs `jobs` stages side by side in worker processes (1: in this process, in order)."""
    distributed.init()
    graph = build_graph(exp)
    check_task_data(exp)
    main = distributed.is_main_process()  # several processes: all train, the main one records
    if distributed.world_size() > 1 and (executor == "ray" or jobs > 1):
        raise UndoError("under accelerate/torchrun every process runs every stage together: "
                        "launch with --jobs 1 (the default there), or without accelerate for --jobs/--executor ray")
    store = None
    if main:
        with write_errors(run_dir):  # e.g. a file where the run directory should be, a read-only disk
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
            store = ResultStore(run_dir / "results.sqlite")
            store.set_graph(node.key for node in graph.nodes.values())
    say(f"{exp.name}: {len(graph.nodes)} stages over seeds {exp.all_seeds()} (run `undo plan` to list them)")
    if executor == "ray":
        run_on_ray(graph, run_dir, ray_options or RayOptions())
    else:
        run_in_pool(graph, run_dir, store, jobs)
    report = run_dir / "report" / "index.html"
    if main:
        info = task_info(graph, run_dir)
        with write_errors(run_dir / "task.json", cleanup=run_dir / "task.json.tmp"):
            (run_dir / "task.json.tmp").write_text(json.dumps(info))
            os.replace(run_dir / "task.json.tmp", run_dir / "task.json")  # never a truncated task.json
        report = write_report_safely(run_dir, store, info)
        print(summary_text(store, info))
        print(stage_table(store, graph))
        print(f"report: {report}")
    distributed.barrier()
    return report
