"""The engine: an experiment is a stage graph. Planning, keys, resume and cache semantics,
the results store per graph and seed, sweeps, and a task and a method from outside the package."""

import copy
import json
import sqlite3

import pytest
import torch

from undo.config import from_dict
from undo.engine import graph as graph_module
from undo.engine.graph import build_graph
from undo.engine.plan import plan_text
from undo.engine.run import run_experiment
from undo.errors import UndoError
from undo.experiment import ExperimentConfig
from undo.models import load_model
from undo.store import ResultStore

TRAIN = {"batch_size": 8, "seq_len": 48, "checkpoint_every": 0}
MICRO = {
    "name": "micro", "seed": 0,
    "task": {"name": "arithmetic", "options": {"examples_per_operation": 40, "eval_per_format": 4,
                                                "quick_eval_per_format": 2}},
    "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "pretrain": {"steps": 8, "lr": 3e-3, **TRAIN},
    "unlearn": {"retain_tolerance": 10.0, "methods": [{"method": "graddiff", "train": {"steps": 2, **TRAIN}}]},
    "undo": {"alphas": [0.5], "unlearn_and_distill": False,
             "distill": {"steps": 2, "eval_every": 1, **TRAIN}},
    "attacks": [{"name": "relearn", "options": {"lrs": [1e-3], "steps": 2, "eval_every": 1, "batch_size": 8,
                                                 "seq_len": 48}}],
}


def micro(**changes) -> ExperimentConfig:
    raw = copy.deepcopy(MICRO)
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(ExperimentConfig, raw)


def weights(path):
    model, _ = load_model(path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("micro")
    run_experiment(micro(), run_dir)
    return run_dir


# ---------------------------------------------------------------- the graph and the plan

def test_the_graph_has_every_stage_and_the_plan_shows_its_state(micro_run, tmp_path):
    graph = build_graph(micro())
    assert list(graph.nodes) == ["seed0/base", "seed0/oracle", "seed0/unlearn/graddiff", "seed0/select/undo_teacher",
                                 "seed0/undo/undo_a0.5"] + [f"seed0/attack/relearn/{m}/lr0.001-as0"
                                                            for m in ("base", "oracle", "graddiff", "undo_a0.5")]
    assert graph.nodes["seed0/undo/undo_a0.5"].inputs == {"teacher": "seed0/select/undo_teacher"}
    fresh = plan_text(graph, tmp_path / "empty")
    rows = fresh.splitlines()[1:-1]
    assert len(rows) == len(graph.nodes) and all(" to run " in row for row in rows) and "9 stages, 0 done" in fresh
    done = plan_text(graph, micro_run)
    assert "9 stages, 9 done" in done
    for node in graph.nodes.values():
        assert node.key in done and node.key in fresh


def test_keys_change_downstream_and_with_stage_and_package_versions(monkeypatch):
    a = build_graph(micro()).nodes
    b = build_graph(micro(unlearn__methods=[{"method": "graddiff", "train": {"steps": 3, **TRAIN}}])).nodes
    assert a["seed0/base"].key == b["seed0/base"].key
    for node_id in ("seed0/unlearn/graddiff", "seed0/undo/undo_a0.5", "seed0/attack/relearn/graddiff/lr0.001-as0",
                    "seed0/attack/relearn/undo_a0.5/lr0.001-as0"):
        assert a[node_id].key != b[node_id].key
    assert a["seed0/attack/relearn/base/lr0.001-as0"].key == b["seed0/attack/relearn/base/lr0.001-as0"].key
    monkeypatch.setitem(graph_module.STAGES, "pretrain", (graph_module.STAGES["pretrain"][0], 99))
    assert build_graph(micro()).nodes["seed0/base"].key != a["seed0/base"].key
    monkeypatch.undo()
    monkeypatch.setattr(graph_module, "__version__", "9.9.9")
    assert build_graph(micro()).nodes["seed0/base"].key != a["seed0/base"].key


def test_one_attack_run_is_keyed_by_its_own_learning_rate_only():
    one = build_graph(micro()).nodes
    two = build_graph(micro(attacks=[{"name": "relearn", "options": {**MICRO["attacks"][0]["options"],
                                                                      "lrs": [1e-3, 3e-3]}}])).nodes
    assert one["seed0/attack/relearn/base/lr0.001-as0"].key == two["seed0/attack/relearn/base/lr0.001-as0"].key
    assert "seed0/attack/relearn/base/lr0.003-as0" in two


def test_bad_graphs_are_one_clear_error():
    with pytest.raises(UndoError, match="undo.after: no recipe named nope"):
        build_graph(micro(undo__after=["nope"]))
    with pytest.raises(UndoError, match="no model named ghost"):
        build_graph(micro(attacks=[{"name": "relearn", "targets": ["ghost"]}]))
    with pytest.raises(UndoError, match="needs a teacher model and the experiment has no 'oracle'"):
        build_graph(micro(models={"base": {}}, unlearn__methods=[{"method": "oracle_matching"}]))
    with pytest.raises(UndoError, match="unknown attack 'relern'"):
        micro(attacks=[{"name": "relern"}])
    with pytest.raises(UndoError, match="'attack' was replaced by attacks"):
        from undo.experiment import load_experiment
        load_experiment("quick", ["attack.steps=3"])


# ---------------------------------------------------------------- resume points and the cache

def _interrupt_after(monkeypatch, module, name, calls: int):
    """Make `module.name` (a loss function) raise KeyboardInterrupt on call number `calls`."""
    plain, count = getattr(module, name), []

    def interrupting(*args, **kwargs):
        count.append(1)
        if len(count) == calls:
            raise KeyboardInterrupt
        return plain(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)


def test_a_changed_config_never_resumes_the_old_configs_state(tmp_path, monkeypatch):
    """Killed after a resume point with lr A, rerun with lr B: B's run starts fresh."""
    from undo.engine.single import pretrain
    from undo.stages import pretrain as pretrain_module

    old = micro(pretrain__checkpoint_every=2, pretrain__lr=1e-2)
    new = micro(pretrain__checkpoint_every=2, pretrain__lr=3e-3)
    _interrupt_after(monkeypatch, pretrain_module, "lm_loss", 6)   # resume point at step 4 of 8
    with pytest.raises(KeyboardInterrupt):
        pretrain(old, tmp_path / "run", "base")
    assert (tmp_path / "run" / "seed0" / "base.resume").exists()
    monkeypatch.undo()
    resumed = pretrain(new, tmp_path / "run", "base")
    fresh = pretrain(new, tmp_path / "fresh", "base")
    assert resumed.result()["steps"] == 8
    assert same_weights(weights(resumed.model_dir), weights(fresh.model_dir))


def test_a_killed_stage_resumes_to_the_same_weights_and_keeps_its_time(tmp_path, monkeypatch):
    from undo.engine.single import pretrain
    from undo.stages import pretrain as pretrain_module

    exp = micro(pretrain__checkpoint_every=2)
    _interrupt_after(monkeypatch, pretrain_module, "lm_loss", 6)
    with pytest.raises(KeyboardInterrupt):
        pretrain(exp, tmp_path / "run", "base")
    state = next((tmp_path / "run" / "seed0" / "base.resume").glob("*/state.json"))
    spent = json.loads(state.read_text())["elapsed"]
    monkeypatch.undo()
    resumed = pretrain(exp, tmp_path / "run", "base")
    fresh = pretrain(exp, tmp_path / "fresh", "base")
    assert same_weights(weights(resumed.model_dir), weights(fresh.model_dir))
    assert resumed.result()["stage_seconds"] > spent > 0


def test_a_diverged_stage_leaves_no_resume_point(tmp_path, monkeypatch):
    from undo.engine.single import pretrain
    from undo.stages import pretrain as pretrain_module
    from undo.training import LossOutput

    plain, count = pretrain_module.lm_loss, []

    def diverging(model, batches):
        count.append(1)
        out = plain(model, batches)
        return LossOutput(out.loss * float("nan")) if len(count) >= 4 else out

    monkeypatch.setattr(pretrain_module, "lm_loss", diverging)
    with pytest.raises(UndoError, match="loss became nan"):
        pretrain(micro(pretrain__checkpoint_every=1), tmp_path / "run", "base")
    assert not (tmp_path / "run" / "seed0" / "base.resume").exists()
    assert not (tmp_path / "run" / "seed0" / "base").exists()
    assert not list(tmp_path.rglob("*.partial"))


def test_a_cached_rerun_trains_nothing_and_keeps_stage_times(micro_run, monkeypatch):
    before = {r["stage"]: r["seconds"] for r in ResultStore(micro_run / "results.sqlite").stage_times()}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached stage trained again")

    for module in ("undo.stages.pretrain", "undo.stages.undo", "undo.attacks.relearn", "undo.stages.unlearn"):
        monkeypatch.setattr(f"{module}.train", no_training)
    run_experiment(micro(), micro_run)
    after = ResultStore(micro_run / "results.sqlite").stage_times()
    assert all(r["cached"] for r in after)
    assert {r["stage"]: r["seconds"] for r in after} == before and before["seed0/base"] > 0


# ---------------------------------------------------------------- results store per graph

def test_rows_of_an_earlier_config_never_reach_the_store_or_the_report(tmp_path):
    wide = micro(undo__alphas=[0.5, 0.8], attacks=[{"name": "relearn", "options": {
        **MICRO["attacks"][0]["options"], "lrs": [1e-3, 3e-3]}}])
    run_experiment(wide, tmp_path)
    store = ResultStore(tmp_path / "results.sqlite")
    assert "undo_a0.8" in [m["name"] for m in store.models()]
    run_experiment(micro(), tmp_path)  # narrower: one alpha, one lr
    names = [m["name"] for m in store.models()]
    assert names == ["base", "oracle", "graddiff", "undo_a0.5"]
    assert {p["lr"] for m in names for p in store.attack_points(m)} == {1e-3}
    assert all(r["stage"] in build_graph(micro()).nodes for r in store.stage_times())
    html = (tmp_path / "report" / "index.html").read_text()
    assert "undo_a0.8" not in html and "lr0.003" not in html


def test_an_unlearn_sweep_runs_every_point_and_undo_follows_its_winner(tmp_path):
    exp = micro(unlearn__sweep={"lr": [1e-5, 1e-3]})
    run_experiment(exp, tmp_path)
    points = [tmp_path / "seed0" / "unlearn" / f"graddiff-lr={v}" for v in ("1e-05", "0.001")]
    assert all((p / "model" / "config.json").exists() for p in points)
    winner = json.loads((tmp_path / "seed0" / "unlearn" / "graddiff" / "result.json").read_text())
    assert winner["chosen"] in ("graddiff-lr=1e-05", "graddiff-lr=0.001")
    assert set(winner["candidates"]) == {"graddiff-lr=1e-05", "graddiff-lr=0.001"}
    store = ResultStore(tmp_path / "results.sqlite")
    kinds = {m["name"]: m["kind"] for m in store.models()}
    assert kinds["graddiff"] == "method" and kinds["graddiff-lr=1e-05"] == "sweep"
    assert store.attack_points("graddiff") and not store.attack_points("graddiff-lr=1e-05")


def test_two_seeds_give_per_seed_rows_and_a_report_with_both(tmp_path):
    run_experiment(micro(seeds=[0, 1], undo__after="none", unlearn__methods=[]), tmp_path)
    store = ResultStore(tmp_path / "results.sqlite")
    rows = [(m["name"], m["seed"]) for m in store.models()]
    assert sorted(rows) == [("base", 0), ("base", 1), ("oracle", 0), ("oracle", 1)]
    base = {m["seed"]: m["metrics"] for m in store.models() if m["name"] == "base"}
    assert base[0] != base[1]  # another seed: other data order and initialisation
    assert {p["seed"] for p in store.attack_points("base")} == {0, 1}
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<th>seed</th>" in html and "Graph seeds: 0, 1" in html and "mean over 2 graph seeds [min, max]" in html
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM attack_points").fetchone()[0] == 2 * 2 * 3  # models x seeds x steps


def test_attack_seeds_replicate_only_the_attacks():
    graph = build_graph(micro(attack_seeds=[0, 1]))
    attacks = [n for n in graph.nodes if "/attack/" in n]
    assert len(attacks) == 8 and len([n for n in graph.nodes if "/attack/" not in n]) == 5
    a0 = graph.nodes["seed0/attack/relearn/base/lr0.001-as0"]
    a1 = graph.nodes["seed0/attack/relearn/base/lr0.001-as1"]
    assert a0.inputs == a1.inputs and a0.key != a1.key


def test_an_attack_that_ignores_its_seed_runs_once_per_model_and_point():
    """Quantization is a function of the weights alone: attack seeds would repeat it exactly."""
    graph = build_graph(micro(attack_seeds=[0, 1, 2], attacks=[
        {"name": "relearn", "options": {"lrs": [1e-3], "steps": 2, "eval_every": 2}},
        {"name": "quantize", "options": {"bits": [8, 4]}}]))
    quantize = sorted(n for n in graph.nodes if "/attack/quantize/" in n)
    relearn = [n for n in graph.nodes if "/attack/relearn/" in n]
    models = len(graph.models(0))
    assert len(relearn) == 3 * models and len(quantize) == 2 * models
    assert all(n.endswith("-as0") for n in quantize)


# ---------------------------------------------------------------- plugins from outside the package

def test_a_task_and_a_method_from_a_test_directory_run_the_whole_graph(tmp_path, monkeypatch):
    from toy_plugins import ToyAscent, ToyTask
    from undo.methods import base as method_registry
    from undo.tasks import _REGISTRY as task_registry

    monkeypatch.setitem(task_registry, "toy", ToyTask)
    monkeypatch.setitem(method_registry._REGISTRY, "toy_ascent", ToyAscent)
    exp = micro(task={"name": "toy", "options": {}},
                unlearn__methods=[{"method": "toy_ascent", "train": {"steps": 6, "lr": 1e-3, **TRAIN}}],
                undo__stop_rule="none")
    report = run_experiment(exp, tmp_path)
    store = ResultStore(tmp_path / "results.sqlite")
    models = {m["name"]: m for m in store.models()}
    assert list(models) == ["base", "oracle", "toy_ascent", "undo_a0.5"]
    assert models["toy_ascent"]["metrics"]["forget_ce"] > models["base"]["metrics"]["forget_ce"]
    assert all(store.attack_points(name) for name in models)
    assert "toy_ascent" in report.read_text() and "forget_ce" in report.read_text()


def test_the_ray_executor_without_ray_names_the_install_command(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UndoError, match=r"pip install -e '\.\[ray\]'"):
        run_experiment(micro(unlearn__methods=[], undo__after="none", attacks=[],
                             models={"base": {}}), tmp_path, executor="ray")


def test_a_claimed_stage_runs_once_when_two_workers_want_it(tmp_path, monkeypatch):
    """What keeps Ray workers from running a stage twice: the claim, then a second cache look-up."""
    import threading

    from undo.engine import runner

    exp = micro()
    node = build_graph(exp).nodes["seed0/base"]
    plain, calls = runner.STAGES["pretrain"], []

    def counted(ctx):
        calls.append(1)
        return plain[0](ctx)

    monkeypatch.setitem(runner.STAGES, "pretrain", (counted, plain[1]))
    results = []
    workers = [threading.Thread(target=lambda: results.append(runner.run_stage(node, exp, tmp_path, {}, exclusive=True)))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 2
    assert all(r.is_done(node.key) for r in results)


def test_an_attack_that_reads_the_base_gets_it_as_an_input_and_its_run_receives_it(monkeypatch):
    from undo.attacks.ablate import Ablate
    from undo.stages import attack as attack_stage

    graph = build_graph(micro(attacks=[{"name": "ablate"}]))
    attacks = [n for n in graph.nodes.values() if n.kind == "attack"]
    assert attacks and all(n.inputs["base"] == "seed0/base" for n in attacks)
    relearn = [n for n in build_graph(micro()).nodes.values() if n.kind == "attack"]
    assert all("base" not in n.inputs for n in relearn)

    seen = {}
    monkeypatch.setattr(Ablate, "run", lambda self, exp, model_dir, point, seed, desc, base_dir=None:
                        seen.setdefault("base_dir", base_dir) and {"curve": [], "flops": 0.0, "wall_seconds": 0.0})

    class Input:
        def __init__(self, path):
            self.model_dir = path

    class Ctx:
        exp, node = micro(), attacks[0]
        params = attacks[0].params
        inputs = {"target": Input("/t"), "base": Input("/b")}

    attack_stage.run(Ctx())
    assert seen["base_dir"] == "/b"
