"""What later methods need from the engine, each proven on a stub method (tests/toy_plugins.py):
auxiliary models the engine trains and caches, an edit without training, training only added
adapters (peft), and a loss that samples from the model in the loop."""

import json

import pytest
import torch

from test_engine import TRAIN, micro, same_weights, weights
from toy_plugins import LoraAscent, SampledAscent, ShardEnsemble, ZeroRows
from undo.engine.graph import build_graph
from undo.engine.run import run_experiment
from undo.methods import base as method_registry
from undo.models import load_model
from undo.store import ResultStore

STUBS = {"shard_ensemble": ShardEnsemble, "zero_rows": ZeroRows, "lora_ascent": LoraAscent,
         "sampled_ascent": SampledAscent}


@pytest.fixture(autouse=True)
def stubs(monkeypatch):
    for name, cls in STUBS.items():
        monkeypatch.setitem(method_registry._REGISTRY, name, cls)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One run directory: the base model is pretrained once and cached for every test."""
    return tmp_path_factory.mktemp("stubs")


def only(method: str, **train):
    """An experiment of the base model and one recipe: no oracle, UNDO or attacks."""
    return micro(models={"base": {}}, undo__after="none", attacks=[],
                 unlearn__methods=[{"method": method, "train": {**TRAIN, "steps": 3, **train}}])


def unlearned(run_dir, name):
    return json.loads((run_dir / "seed0" / "unlearn" / name / "result.json").read_text())


def test_auxiliary_models_are_stages_trained_once_and_handed_over(shared_run):
    exp = only("shard_ensemble")
    graph = build_graph(exp)
    aux = [n for n in graph.nodes.values() if n.kind == "aux"]
    assert sorted(n.name for n in aux) == ["reinforced", "shard0", "shard1"]
    assert graph.nodes["seed0/unlearn/shard_ensemble"].inputs == {"model": "seed0/base",
                                                                  **{f"aux:{n.name}": n.id for n in aux}}
    run_experiment(exp, shared_run)
    result = unlearned(shared_run, "shard_ensemble")
    assert result["frozen_models_loaded"] == ["reinforced", "shard0", "shard1"]
    base = json.loads((shared_run / "seed0" / "base" / "result.json").read_text())["metrics"]
    side = {n.name: json.loads((shared_run / n.id / "result.json").read_text()) for n in aux}
    assert side["reinforced"]["metrics"]["forget_ce"] < base["forget_ce"]    # finetuned further on forget data
    assert side["shard0"]["examples"] + side["shard1"]["examples"] == 40 * 2  # disjoint halves of retain
    assert side["shard0"]["metrics"] != side["shard1"]["metrics"]
    # a second method asking for the same auxiliary model shares its stage
    twice = micro(models={"base": {}}, undo__after="none", attacks=[], unlearn__methods=[
        {"method": "shard_ensemble", "train": {**TRAIN, "steps": 3}},
        {"method": "shard_ensemble", "name": "again", "options": {"retain_weight": 2.0}, "train": {**TRAIN, "steps": 3}}])
    assert len([n for n in build_graph(twice).nodes.values() if n.kind == "aux"]) == 3


def test_an_edit_without_training_changes_exactly_what_it_says(shared_run):
    run_experiment(only("zero_rows", steps=0), shared_run)
    result = unlearned(shared_run, "zero_rows")
    assert result["steps"] == 0 and result["flops"] == 0
    base, edited = weights(shared_run / "seed0" / "base" / "model"), \
        weights(shared_run / "seed0" / "unlearn" / "zero_rows" / "model")
    changed = {n for n in base if not torch.equal(base[n], edited[n])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)}
    assert all(edited[n][:, :3].abs().sum() == 0 and torch.equal(edited[n][:, 3:], base[n][:, 3:]) for n in changed)


def test_adapters_train_alone_and_are_merged_into_a_plain_checkpoint(shared_run):
    run_experiment(only("lora_ascent", lr=1e-2), shared_run)
    result = unlearned(shared_run, "lora_ascent")
    assert result["trainable_params"] == 4 * 2 * (2 * 128 + 2 * 128)  # 4 layers x q,v x rank 2 x (in + out)
    model, _ = load_model(shared_run / "seed0" / "unlearn" / "lora_ascent" / "model")
    names = {n for n, _ in model.named_parameters()}
    assert not any("lora" in n for n in names)
    base, merged = weights(shared_run / "seed0" / "base" / "model"), \
        weights(shared_run / "seed0" / "unlearn" / "lora_ascent" / "model")
    changed = {n.split(".")[-2] for n in base if not torch.equal(base[n], merged[n])}
    assert changed == {"q_proj", "v_proj"}
    assert result["metrics"]["forget_ce"] > result["metrics_before"]["forget_ce"]


def test_sampling_in_the_loop_is_seeded_and_resumable(shared_run, tmp_path):
    run_experiment(only("sampled_ascent", steps=4, checkpoint_every=2), shared_run)
    first = weights(shared_run / "seed0" / "unlearn" / "sampled_ascent" / "model")
    # same seed elsewhere: the same samples, the same weights
    run_experiment(only("sampled_ascent", steps=4, checkpoint_every=2), tmp_path)
    assert same_weights(first, weights(tmp_path / "seed0" / "unlearn" / "sampled_ascent" / "model"))
    assert ResultStore(tmp_path / "results.sqlite").models()[-1]["name"] == "sampled_ascent"
