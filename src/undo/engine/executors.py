"""Executors run a graph's stages: in this process, in order; in a pool of local worker
processes (`--jobs N`: independent stages side by side on one machine); or on Ray.

All call the same stage helper (`runner.run_stage`), so a stage is cached, claimed,
written atomically and recorded the same way wherever it runs. The pool starts a stage as
soon as its inputs exist, the one with the longest chain of work after it first (so the
UNDO distillations start early and the short attack runs fill the gaps). The Ray executor
submits every stage as a task whose arguments include its inputs' tasks, so Ray starts a
stage as soon as its inputs exist and runs independent stages (methods, sweep points,
seeds, attack runs) side by side on as many workers as the cluster has.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import multiprocessing
import os
import queue
import signal
from pathlib import Path
from typing import Any, Optional

from ..artifacts import Artifact
from ..errors import UndoError
from ..log import quiet_libraries, say
from ..stages.base import StageNode
from ..store import ResultStore
from .graph import Graph, build_graph
from .runner import record, run_stage

TRAINING_KINDS = ("pretrain", "aux", "unlearn", "distill", "attack")


def inputs_of(node: StageNode, run_dir: Path) -> dict[str, Artifact]:
    return {role: Artifact(run_dir, source) for role, source in node.inputs.items()}


def _announce(node: StageNode, i: int, total: int) -> None:
    if node.kind != "attack" or i == total or i % 10 == 0:  # attack runs are many and short
        say(f"stage {i}/{total}: {node.id}")


def run_in_process(graph: Graph, run_dir: Path, store: Optional[ResultStore]) -> None:
    total = len(graph.nodes)
    for i, node in enumerate(graph.nodes.values(), 1):
        _announce(node, i, total)
        run_stage(node, graph.exp.for_seed(node.seed), run_dir, inputs_of(node, run_dir), store)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_jobs() -> int:
    """Stages side by side by default on a CPU-only machine (up to 4: tiny models gain little
    from more threads per stage, and every worker holds its own models); one at a time where a
    GPU is visible (the stages would share it)."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(4, usable_cores()))


# Rough relative cost of a stage of each kind, for the pool's order (not for any result).
_KIND_COST = {"pretrain": 10.0, "checkpoint": 1.0, "aux": 3.0, "unlearn": 2.0, "select": 0.0, "noise": 0.1,
              "distill": 4.0, "attack": 0.2}


def critical_path(graph: Graph) -> dict[str, float]:
    """Each stage's cost plus the costliest chain of stages that need it: the pool starts the
    ready stage with the most work behind it first."""
    after: dict[str, list[str]] = {node_id: [] for node_id in graph.nodes}
    for node in graph.nodes.values():
        for source in node.inputs.values():
            if source in after:
                after[source].append(node.id)
    path: dict[str, float] = {}
    for node_id in reversed(list(graph.nodes)):  # graph order is topological
        path[node_id] = _KIND_COST.get(graph.nodes[node_id].kind, 1.0) + max(
            (path[child] for child in after[node_id]), default=0.0)
    return path


_WORKER_GRAPHS: dict[str, Graph] = {}


def _worker_graph(config_json: str) -> Graph:
    """The graph, rebuilt in a worker from the experiment's config (deterministic), once per worker."""
    from ..config import from_dict
    from ..experiment import ExperimentConfig

    if config_json not in _WORKER_GRAPHS:
        _WORKER_GRAPHS[config_json] = build_graph(from_dict(ExperimentConfig, json.loads(config_json), "config"))
    return _WORKER_GRAPHS[config_json]


def _pool_worker_init(threads: int, parent: int) -> None:
    import threadpoolctl
    import torch

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool, once
    os.environ["UNDO_PROGRESS"] = "lines"  # several workers' bars would garble the terminal
    quiet_libraries()
    torch.set_num_threads(threads)
    # numpy's BLAS (scikit-learn's probes) and OpenMP keep a pool of all cores otherwise: two
    # workers then run 4 threads on 2 cores, and a probe took 3-8x longer than alone.
    threadpoolctl.threadpool_limits(threads)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel ends this worker when the main process dies, however it dies (kill -9
    included), so no orphan goes on training; elsewhere a no-op. A parent that died while this
    worker started up (before the request) has already left it to another parent: exit now."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _pool_stage(config_json: str, node_id: str, run_dir: str) -> str:
    graph = _worker_graph(config_json)
    node = graph.nodes[node_id]
    run_stage(node, graph.exp.for_seed(node.seed), Path(run_dir), inputs_of(node, Path(run_dir)), exclusive=True)
    return node_id


def run_in_pool(graph: Graph, run_dir: Path, store: Optional[ResultStore], jobs: int,
                threads_per_job: Optional[int] = None) -> None:
    """Run the graph on `jobs` local worker processes (spawned: each imports torch afresh)
    with `threads_per_job` torch threads each (default: the cores shared out). The main
    process records every result in the store, in the order stages finish. The first failure
    stops the pool (other stages in flight are killed; their artifacts are written atomically,
    so nothing half-written stays) and ends the run with that stage's own message."""
    if jobs <= 1:
        return run_in_process(graph, run_dir, store)
    _PoolRun(graph, run_dir, store, jobs, threads_per_job or max(1, usable_cores() // jobs)).run()


class _PoolRun:
    """One graph on a worker pool: which stages wait, run and are done. The pool starts at the
    first stage that is not cached (a rerun of a finished graph spawns no worker)."""

    def __init__(self, graph: Graph, run_dir: Path, store: Optional[ResultStore], jobs: int, threads: int):
        from ..config import to_dict

        self.graph, self.run_dir, self.store, self.jobs, self.threads = graph, run_dir, store, jobs, threads
        self.config_json, self.priority = json.dumps(to_dict(graph.exp)), critical_path(graph)
        self.waiting, self.done, self.running = dict(graph.nodes), set(), 0
        self.finished: queue.Queue = queue.Queue()
        self.pool = None

    def run(self) -> None:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill`: stop the workers too
        try:
            while self.waiting or self.running:
                self._start_ready()
                if self.running:
                    self._collect()
                elif self.waiting and not self._ready():  # cannot happen in a built graph
                    raise UndoError(f"stages wait for inputs that no stage makes: {', '.join(self.waiting)}")
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.pool is not None:
                self.pool.terminate()
                self.pool.join()

    def _ready(self) -> list[StageNode]:
        ready = [n for n in self.waiting.values() if all(source in self.done for source in n.inputs.values())]
        return sorted(ready, key=lambda n: -self.priority[n.id])

    def _start_ready(self) -> None:
        for node in self._ready():
            if Artifact(self.run_dir, node.id).is_done(node.key):  # cached: no worker needed
                run_stage(node, self.graph.exp.for_seed(node.seed), self.run_dir, inputs_of(node, self.run_dir),
                          self.store)
                del self.waiting[node.id]
                self.done.add(node.id)
            elif self.running < self.jobs:
                del self.waiting[node.id]
                self.running += 1
                _announce(node, len(self.done) + self.running, len(self.graph.nodes))
                self._worker_pool().apply_async(
                    _pool_stage, (self.config_json, node.id, str(self.run_dir)),
                    callback=lambda _, n=node: self.finished.put((n, None)),
                    error_callback=lambda e, n=node: self.finished.put((n, e)))

    def _worker_pool(self):
        if self.pool is None:
            say(f"running up to {self.jobs} stages side by side ({self.threads} thread{'s' * (self.threads > 1)} each)")
            self.pool = multiprocessing.get_context("spawn").Pool(self.jobs, _pool_worker_init,
                                                                  (self.threads, os.getpid()))
        return self.pool

    def _collect(self) -> None:
        """Wait for the next stage to finish; record it, or raise its error."""
        node, error = self.finished.get()
        self.running -= 1
        if error is not None:
            raise error
        if self.store is not None:
            record(self.store, node, Artifact(self.run_dir, node.id).result(), cached=False)
        self.done.add(node.id)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@dataclasses.dataclass
class RayOptions:
    address: Optional[str] = None       # None: a local Ray on this machine; "HOST:PORT": a cluster
    num_cpus: Optional[int] = None      # workers of a local Ray (default: the machine's cores)
    gpus_per_stage: float = 0.0         # GPUs requested by each training stage


def _ray_stage(config: dict[str, Any], node_id: str, run_dir: str, *parents: str) -> str:
    """One stage in a Ray worker: the graph is rebuilt from the config (it is deterministic),
    then the node runs through the same stage helper as in process."""
    os.environ.setdefault("UNDO_NO_PROGRESS", "1")
    quiet_libraries()
    graph = _worker_graph(json.dumps(config))
    node = graph.nodes[node_id]
    store = ResultStore(Path(run_dir) / "results.sqlite")
    run_stage(node, graph.exp.for_seed(node.seed), Path(run_dir), inputs_of(node, Path(run_dir)), store, exclusive=True)
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
