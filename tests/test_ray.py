"""The Ray executor: a small graph on a local 2-worker Ray gives the numbers of the
in-process executor, and never runs a stage twice."""

import json

import ray

from test_engine import MICRO, TRAIN, micro
from undo.engine.executors import RayOptions
from undo.engine.graph import build_graph
from undo.engine.run import run_experiment
from undo.store import ResultStore


def test_ray_executor_gives_the_in_process_numbers(tmp_path):
    exp = micro(unlearn__methods=[{"method": "graddiff", "train": {"steps": 2, **TRAIN}},
                                  {"method": "maxent", "train": {"steps": 2, **TRAIN}}],
                attacks=[{"name": "relearn", "options": {**MICRO["attacks"][0]["options"], "lrs": [1e-3, 3e-3]}}])
    run_experiment(exp, tmp_path / "local")
    run_experiment(exp, tmp_path / "ray", executor="ray", ray_options=RayOptions(num_cpus=2))
    assert not ray.is_initialized()  # the executor shuts down the Ray it started
    local, remote = ResultStore(tmp_path / "local" / "results.sqlite"), ResultStore(tmp_path / "ray" / "results.sqlite")
    assert [(m["name"], m["metrics"]) for m in local.models()] == [(m["name"], m["metrics"]) for m in remote.models()]
    for model in local.models():
        assert local.attack_points(model["name"]) == remote.attack_points(model["name"])
    stages = remote.stage_times()  # every stage ran once, in a worker (none found in a cache)
    assert [r["stage"] for r in stages] == list(build_graph(exp).nodes) and not any(r["cached"] for r in stages)
    side = json.loads((tmp_path / "ray" / "seed0" / "undo" / "undo_a0.5" / "result.json").read_text())
    assert side["key"] == json.loads((tmp_path / "local" / "seed0" / "undo" / "undo_a0.5" / "result.json")
                                     .read_text())["key"]
    assert (tmp_path / "ray" / "report" / "index.html").exists()
