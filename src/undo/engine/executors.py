"""Executors run a graph's stages: in this process, in order (the default), or on Ray.

Both call the same stage helper (`runner.run_stage`), so a stage is cached, claimed,
written atomically and recorded the same way wherever it runs. The Ray executor submits
every stage as a task whose arguments include its inputs' tasks, so Ray starts a stage
as soon as its inputs exist and runs independent stages (methods, sweep points, seeds,
attack runs) side by side on as many workers as the cluster has.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from ..artifacts import Artifact
from ..errors import UndoError
from ..log import say
from ..stages.base import StageNode
from ..store import ResultStore
from .graph import Graph, build_graph
from .runner import run_stage

TRAINING_KINDS = ("pretrain", "aux", "unlearn", "distill", "attack")


def inputs_of(node: StageNode, run_dir: Path) -> dict[str, Artifact]:
    return {role: Artifact(run_dir, source) for role, source in node.inputs.items()}


def run_in_process(graph: Graph, run_dir: Path, store: Optional[ResultStore]) -> None:
    total = len(graph.nodes)
    for i, node in enumerate(graph.nodes.values(), 1):
        if node.kind != "attack" or i == total or i % 10 == 0:
            say(f"stage {i}/{total}: {node.id}")
        run_stage(node, graph.exp.for_seed(node.seed), run_dir, inputs_of(node, run_dir), store)


@dataclasses.dataclass
class RayOptions:
    address: Optional[str] = None       # None: a local Ray on this machine; "HOST:PORT": a cluster
    num_cpus: Optional[int] = None      # workers of a local Ray (default: the machine's cores)
    gpus_per_stage: float = 0.0         # GPUs requested by each training stage


def _ray_stage(config: dict[str, Any], node_id: str, run_dir: str, *parents: str) -> str:
    """One stage in a Ray worker: the graph is rebuilt from the config (it is deterministic),
    then the node runs through the same stage helper as in process."""
    from ..config import from_dict
    from ..experiment import ExperimentConfig

    os.environ.setdefault("UNDO_NO_PROGRESS", "1")
    exp = from_dict(ExperimentConfig, config, "config")
    node = build_graph(exp).nodes[node_id]
    store = ResultStore(Path(run_dir) / "results.sqlite")
    run_stage(node, exp.for_seed(node.seed), Path(run_dir), inputs_of(node, Path(run_dir)), store, exclusive=True)
    return node_id


def run_on_ray(graph: Graph, run_dir: Path, options: RayOptions) -> None:
    try:
        import ray
    except ImportError:
        raise UndoError("the ray executor needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from None
    from ..config import to_dict

    started = not ray.is_initialized()
    if started:
        kwargs = {"address": options.address} if options.address else {"num_cpus": options.num_cpus}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        except ConnectionError as e:
            raise UndoError(f"cannot reach the Ray cluster at {options.address} ({e}); check --address") from None
    try:
        remote = ray.remote(max_retries=0)(_ray_stage)
        config, refs = to_dict(graph.exp), {}
        for node in graph.nodes.values():
            gpus = options.gpus_per_stage if node.kind in TRAINING_KINDS else 0
            parents = [refs[source] for source in node.inputs.values()]
            refs[node.id] = remote.options(num_cpus=1, num_gpus=gpus).remote(config, node.id, str(run_dir), *parents)
        say(f"ray: {len(refs)} stages submitted")
        _wait_all(ray, list(refs.values()))
    finally:
        if started:
            ray.shutdown()


def _wait_all(ray, refs: list) -> None:
    """Wait for every stage; the first failure ends the run with its own message."""
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            node_id = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, UndoError):
                raise UndoError(str(cause).splitlines()[0]) from None
            raise
        done += 1
        say(f"ray: {done}/{len(refs)} done ({node_id})")
