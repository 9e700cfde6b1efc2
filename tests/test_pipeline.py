"""The whole experiment on the `quick` preset: end to end, cached, and resumable after kill -9."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from undo.experiment import load_experiment
from undo.engine.run import run_experiment


def _models(run_dir: Path) -> dict:
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        rows = db.execute("SELECT name, metrics FROM models").fetchall()
    return {name: json.loads(metrics) for name, metrics in rows}


def _attacks(run_dir: Path) -> list:
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        return sorted(db.execute("SELECT model, lr, step, metrics FROM attack_points").fetchall())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quick")
    report = run_experiment(load_experiment("quick"), run_dir)
    return run_dir, report


def test_quick_pipeline_produces_every_model_attack_and_report(quick_run):
    run_dir, report = quick_run
    models = _models(run_dir)
    assert set(models) == {"base", "oracle", "graddiff", "oracle_matching", "unlearn_distill", "undo_a0.5"}
    attacked = {row[0] for row in _attacks(run_dir)}
    assert attacked == set(models)
    html = report.read_text()
    for png in ("relearning.png", "pareto.png", "compute.png"):
        assert png in html and (report.parent / png).stat().st_size > 5000
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.rglob("*.resume"))
    assert not list(run_dir.rglob("*.lock"))  # stages are claimed only when they may run side by side (Ray)


def test_rerun_is_fully_cached(quick_run, monkeypatch):
    run_dir, _ = quick_run
    def no_training(*args, **kwargs):
        raise AssertionError("a cached stage trained again")

    for module in ("undo.stages.pretrain", "undo.stages.undo", "undo.attacks.relearn", "undo.stages.unlearn",
                   "undo.stages.aux"):
        monkeypatch.setattr(f"{module}.train", no_training)
    before = _attacks(run_dir)
    run_experiment(load_experiment("quick"), run_dir)
    assert _attacks(run_dir) == before


def test_killed_run_resumes_to_the_same_numbers(quick_run, tmp_path):
    """kill -9 at a random moment, run the same command again: same numbers as uninterrupted."""
    run_dir, _ = quick_run
    target = tmp_path / "killed"
    cmd = [sys.executable, "-m", "undo.cli", "run", "quick", "--run-dir", str(target)]
    # One thread, as the fixture's run in this process: float sums differ between thread counts.
    env = {**os.environ, "UNDO_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    delay = random.Random(int(time.time())).uniform(8, 25)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _models(target) == _models(run_dir), f"killed after {delay:.1f}s"
    assert _attacks(target) == _attacks(run_dir)


def test_quick_pipeline_on_two_processes_records_once(quick_run, tmp_path):
    """`undo run quick` under torchrun (2 CPU processes, gloo): every stage trains on both,
    the main process alone writes the results store and the report, and the store has
    the same models and attack points as the 1-process run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "UNDO_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           "-m", "undo.cli", "run", "quick", "--run-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report: ") == 1 and done.stdout.count("stage 5/18: seed0/undo/unlearn_distill") == 1
    one_dir, _ = quick_run
    assert set(_models(tmp_path)) == set(_models(one_dir))
    assert [row[:3] for row in _attacks(tmp_path)] == [row[:3] for row in _attacks(one_dir)]
    assert (tmp_path / "report" / "index.html").exists()
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.resume"))
