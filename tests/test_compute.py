"""Compute: what each stage counts (SAM's two passes, RepNoise's extra work) and what a model's
cumulative FLOPs from scratch include (teachers, auxiliary models, a sweep's every point)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from undo.engine.graph import build_graph
from undo.engine.runner import flops_ancestry
from undo.config import from_dict
from undo.experiment import ExperimentConfig
from undo.methods import build_method
from undo.stages import select
from undo.stages.base import StageNode

IGNORE = -100
BATCH = {"input_ids": torch.tensor([[1, 5, 7, 9, 3], [1, 4, 4, 0, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
         "labels": torch.tensor([[IGNORE, IGNORE, 7, 9, 3], [IGNORE, 4, 4, IGNORE, IGNORE]])}


def tiny_llama(seed=0):
    config = AutoConfig.for_model("llama", vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                  tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def test_repnoise_counts_its_read_outs_and_gram_matrices():
    model = tiny_llama()
    method = build_method("repnoise")
    method.prepare(model)
    out = method.loss(model, {"forget": BATCH, "retain": BATCH})
    # read-outs: 3 layers (all but the last) x 6 x head params (12 x 16) x 10 forget tokens = 34560
    # Gram: 4 layers x 6 x (2 x 2 rows)^2 x (5 tokens x 16 hidden) = 30720
    assert out.extra_flops == 34560 + 30720
    assert out.train_flops is None  # the model's own forward + backward: the loop's 6 x params x tokens


def test_sam_counts_two_passes_at_its_base_methods_cost():
    """Around RMU (a truncated forward: its own train_flops), SAM's two passes cost twice that."""
    model = tiny_llama(0)
    rmu = build_method("rmu", {"retain": False})
    rmu.prepare(model)
    one_pass = rmu.loss(model, {"forget": BATCH, "retain": BATCH})
    sam = build_method("sam", {"base_method": "rmu", "base_options": {"retain": False}})
    sam.prepare(model)
    params = sam.trainable_parameters(model)
    optimizer = torch.optim.SGD(params, lr=0.1)
    out = sam.step_hook()(model, optimizer, lambda: sam.loss(model, {"forget": BATCH, "retain": BATCH}))
    assert one_pass.train_flops is not None
    assert out.train_flops == pytest.approx(2 * one_pass.train_flops)
    assert out.extra_flops == pytest.approx(2 * one_pass.extra_flops)


class Result:
    """An input artifact: only its result.json matters here."""

    def __init__(self, **sidecar):
        self.sidecar = sidecar

    def result(self):
        return self.sidecar


def node(node_id, kind, inputs):
    return StageNode(node_id, kind, node_id.split("/")[-1], 0, {}, inputs)


def test_cumulative_compute_counts_every_stage_once():
    base = Result(flops=100.0, flops_ancestry={"s/base": 100.0})
    oracle = Result(flops=80.0, flops_ancestry={"s/oracle": 80.0})
    aux = Result(flops=5.0, flops_ancestry={"s/base": 100.0, "s/aux": 5.0})
    # oracle matching: continues the base and needs the oracle as a teacher
    om = node("s/om", "unlearn", {"model": "s/base", "teacher": "s/oracle", "aux:r": "s/aux"})
    got = flops_ancestry(om, {"flops": 10.0}, {"model": base, "teacher": oracle, "aux:r": aux})
    assert got == {"s/base": 100.0, "s/oracle": 80.0, "s/aux": 5.0, "s/om": 10.0}  # the base once
    # a distillation inherits its teacher's lineage and a given student's
    teacher = Result(flops=10.0, flops_ancestry={"s/base": 100.0, "s/gd": 10.0})
    distill = node("s/d", "distill", {"teacher": "s/gd", "student": "s/base"})
    got = flops_ancestry(distill, {"flops": 7.0}, {"teacher": teacher, "student": base})
    assert sum(got.values()) == 100.0 + 10.0 + 7.0
    # an input from elsewhere (no ancestry) counts its flops_total
    old = node("s/u", "unlearn", {"model": "ckpt"})
    assert flops_ancestry(old, {"flops": 1.0}, {"model": Result(flops=3.0, flops_total=50.0)}) == {"ckpt": 50.0,
                                                                                                  "s/u": 1.0}


def select_sidecar(compute, tmp_path):
    """The selection stage over two sweep points of which the second wins (lower forget accuracy)."""
    points = {"gd-lr1": Result(flops=10.0, flops_ancestry={"s/base": 100.0, "s/gd-lr1": 10.0},
                               metrics={"forget_acc": 0.5, "retain_acc": 0.9}),
              "gd-lr2": Result(flops=20.0, flops_ancestry={"s/base": 100.0, "s/gd-lr2": 20.0},
                               metrics={"forget_acc": 0.1, "retain_acc": 0.9})}
    for p in points.values():
        p.model_dir = tmp_path
    inputs = {f"c:{n}": p for n, p in points.items()}
    inputs["start"] = Result(metrics={"retain_acc": 0.95})
    n = StageNode("s/gd", "select", "gd", 0, {"tolerance": 0.1, "what": "w", "compute": compute},
                  {role: f"s/{role[2:]}" if role.startswith("c:") else "s/base" for role in inputs})
    ctx = SimpleNamespace(task=SimpleNamespace(forget_metric="forget_acc", retain_metric="retain_acc",
                                               higher_is_better=True),
                          inputs=inputs, params=n.params, node=n, say=lambda *a: None,
                          input_result=lambda role: inputs[role].result())
    sidecar = select.run(ctx).sidecar
    return sidecar, sum(flops_ancestry(n, sidecar, inputs).values())


def test_a_sweep_winner_carries_every_points_compute_a_teacher_choice_only_its_own(tmp_path):
    sweep, total = select_sidecar("all", tmp_path)
    assert sweep["chosen"] == "gd-lr2" and sweep["record_flops"] == 30.0 and total == 100.0 + 10.0 + 20.0
    chosen, total = select_sidecar("chosen", tmp_path)
    assert chosen["record_flops"] == 20.0 and total == 100.0 + 20.0


def test_the_graph_says_which_selection_pays_for_what():
    exp = from_dict(ExperimentConfig, {
        "unlearn": {"methods": [{"method": "graddiff", "sweep": {"lr": [1e-4, 1e-3]}},
                                {"method": "maxent"}]},
        "undo": {"after": "auto"}}, "config")
    graph = build_graph(exp)
    assert graph.nodes["seed0/unlearn/graddiff"].params["compute"] == "all"
    assert graph.nodes["seed0/select/undo_teacher"].params["compute"] == "chosen"
