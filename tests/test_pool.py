"""The local pool executor (`undo run --jobs N`): stages side by side in worker processes give
the numbers of the in-process executor, run once each, resume from the cache, and a failing
stage ends the run with its own one line and nothing half-written."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_engine import MICRO, TRAIN, micro
from undo.cli import main
from undo.engine.executors import critical_path, run_in_pool
from undo.engine.graph import build_graph
from undo.engine.run import run_experiment
from undo.store import ResultStore


def small_graph_config():
    return micro(unlearn__methods=[{"method": "graddiff", "train": {"steps": 2, **TRAIN}},
                                   {"method": "maxent", "train": {"steps": 2, **TRAIN}}],
                 attacks=[{"name": "relearn", "options": {**MICRO["attacks"][0]["options"], "lrs": [1e-3, 3e-3]}}])


def test_two_workers_give_the_in_process_numbers_and_a_rerun_is_all_cached(tmp_path):
    exp = small_graph_config()
    run_experiment(exp, tmp_path / "local")
    # the workers get this process's thread count, so each stage computes exactly as in process
    run_pool = tmp_path / "pool"
    run_in_pool(build_graph(exp), run_pool, None, jobs=2, threads_per_job=torch.get_num_threads())
    run_experiment(exp, run_pool, jobs=2)  # every stage found in the cache: recorded, not rerun
    local, pool = ResultStore(tmp_path / "local" / "results.sqlite"), ResultStore(run_pool / "results.sqlite")
    assert [(m["name"], m["metrics"]) for m in local.models()] == [(m["name"], m["metrics"]) for m in pool.models()]
    for model in local.models():
        assert local.attack_points(model["name"]) == pool.attack_points(model["name"])
    stages = pool.stage_times()
    assert sorted(r["stage"] for r in stages) == sorted(build_graph(exp).nodes) and all(r["cached"] for r in stages)
    assert (run_pool / "report" / "index.html").exists()


def test_the_pool_records_each_stage_once_as_it_finishes(tmp_path):
    exp = micro()
    run_experiment(exp, tmp_path, jobs=2)
    stages = ResultStore(tmp_path / "results.sqlite").stage_times()
    assert sorted(r["stage"] for r in stages) == sorted(build_graph(exp).nodes)
    assert not any(r["cached"] for r in stages)


def test_a_failing_stage_ends_the_pool_with_its_own_line_and_nothing_half_written(tmp_path, capsys):
    raw = {**MICRO, "quality_gate": {"on_miss": "fail", "extend_steps": 2, "max_steps": 8}}  # 8 steps cannot pass arithmetic's gate
    cfg = tmp_path / "gate.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--jobs", "2", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "below the arithmetic quality gate" in err
    assert not list(run.rglob("*.partial")) and not list(run.rglob("result.json"))


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["run", "quick", "--jobs", "0", "--run-dir", str(tmp_path)]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_the_pool_starts_the_stage_with_the_most_work_behind_it_first():
    graph = build_graph(small_graph_config())
    path = critical_path(graph)
    # base pretraining leads to unlearning, distillation and attacks: more than the oracle's chain
    assert path["seed0/base"] > path["seed0/oracle"]
    # the distillation outranks an attack on a model that is ready as early
    assert path["seed0/undo/undo_a0.5"] > path["seed0/attack/relearn/graddiff/lr0.001-as0"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' parent-death signal is Linux's")
def test_killing_the_main_process_ends_its_workers(tmp_path):
    raw = {**MICRO, "pretrain": {**MICRO["pretrain"], "steps": 5000}}  # still pretraining when killed
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "undo.cli", "run", str(cfg), "--jobs", "2", "--run-dir",
                             str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and len(workers) < 2:  # the two workers (and the resource tracker)
        time.sleep(0.5)
        workers = [c for c in _children(proc.pid) if b"spawn_main" in _cmdline(c)]
    assert len(workers) == 2
    while time.time() < deadline and not (tmp_path / "run" / "seed0").exists():
        time.sleep(0.5)  # a worker has started a stage
    proc.kill()
    proc.wait()
    deadline = time.time() + 60  # a worker still importing dies once it is up
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


def test_the_stage_table_puts_the_runs_of_one_attack_on_one_model_on_one_line(tmp_path):
    from undo.engine.run import stage_table

    graph = build_graph(small_graph_config())  # relearn at 2 learning rates on each model
    store = ResultStore(tmp_path / "results.sqlite")
    store.set_graph(node.key for node in graph.nodes.values())
    for node in graph.nodes.values():
        store.record_stage_time(node.id, 1.5, cached=node.kind == "pretrain", key=node.key)
    lines = stage_table(store, graph).splitlines()
    assert any(line.split() == ["seed0/attack/relearn/base", "(2", "runs)", "3.0"] for line in lines)
    assert any(line.split() == ["seed0/base", "1.5", "(cached)"] for line in lines)
    attack_lines = [line for line in lines if "/attack/" in line]
    assert len(attack_lines) == len({n.id.rsplit("/", 1)[0] for n in graph.nodes.values() if n.kind == "attack"})
    assert lines[-1].split() == ["total", f"{1.5 * len(graph.nodes):.1f}"]


def _thread_counts() -> list[int]:
    import threadpoolctl

    return [torch.get_num_threads()] + [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]


def test_a_pool_worker_caps_torch_and_numpys_thread_pools_alike():
    """A worker given one thread must not keep BLAS/OpenMP pools of every core (scikit-learn's
    probes ran 3-8x slower with two workers on two cores before)."""
    import multiprocessing

    from undo.engine.executors import _pool_worker_init

    with multiprocessing.get_context("spawn").Pool(1, _pool_worker_init, (1, os.getpid())) as pool:
        counts = pool.apply(_thread_counts)
    assert counts and set(counts) == {1}
