"""`undo plan`: the stage graph before anything runs.

Each stage with its inputs, its cache key, whether it is already done, and an estimate of
its training FLOPs (6 x params x tokens, plus 2 x params x tokens per frozen model forward,
counting every row at its full seq_len: an upper bound where rows are padded) and of its
training time: those FLOPs over the rate estimated the same way on this run's finished
stages, or on the default preset on 2 CPU cores when none is finished. Evaluation time is
not in the estimate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Artifact
from ..experiment import ExperimentConfig
from ..stages.base import StageNode
from .executors import default_jobs
from .graph import Graph

# Estimated FLOPs per second of pretraining the default (arithmetic) preset on 2 CPU cores:
# 1,800 steps x 64 rows x 128 tokens x 6 x 1.0M params in 142 s (benchmarks/RESULTS.md).
DEFAULT_RATE = 6e11
FROZEN_FORWARDS = {"distill": 1, "unlearn": 0}


def model_params(exp: ExperimentConfig) -> int:
    """Non-embedding parameters of the experiment's model, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import non_embedding_params, preset_config

    if exp.model.path:
        config = AutoConfig.from_pretrained(exp.model.path)
    else:
        config = preset_config(exp.model.preset, exp.tokenizer.vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return non_embedding_params(model)


def estimate_flops(node: StageNode, n_params: int) -> float:
    """Training FLOPs of one stage from its settings (0 for stages that do not train)."""
    p = node.params
    if node.kind == "attack":
        o = p["options"]
        return 6.0 * n_params * o.get("steps", 0) * o.get("batch_size", 0) * o.get("seq_len", 0)
    train = p.get("train")
    if not train or node.kind in ("select", "checkpoint"):
        return 0.0
    tokens = train["steps"] * train["batch_size"] * train["seq_len"]
    if node.kind == "unlearn":
        streams = 2 if p["options"].get("retain_weight", 0) else 1
        frozen = sum(1 for role in node.inputs if role == "teacher") + int(p["options"].get("retain_loss") == "kl")
        return (6.0 * streams + 2.0 * frozen) * n_params * tokens
    return (6.0 + 2.0 * FROZEN_FORWARDS.get(node.kind, 0)) * n_params * tokens


def measured_rate(graph: Graph, run_dir: Path, n_params: int) -> float:
    """Estimated FLOPs per second of training on this run's finished stages, else the default."""
    flops = seconds = 0.0
    for node in graph.nodes.values():
        result = Artifact(run_dir, node.id).result() if (run_dir / node.id / "result.json").exists() else None
        if result and result.get("wall_seconds", 0) > 1 and result.get("steps"):
            flops, seconds = flops + estimate_flops(node, n_params), seconds + result["wall_seconds"]
    return flops / seconds if seconds > 0 and flops > 0 else DEFAULT_RATE


def plan_rows(graph: Graph, run_dir: Path) -> list[dict[str, Any]]:
    n_params = model_params(graph.exp)
    rate = measured_rate(graph, run_dir, n_params)
    rows = []
    for node in graph.nodes.values():
        done = Artifact(run_dir, node.id).is_done(node.key) if (run_dir / node.id / "result.json").exists() else False
        flops = estimate_flops(node, n_params)
        rows.append({"stage": node.id, "kind": node.kind, "inputs": dict(node.inputs), "key": node.key,
                     "done": done, "flops": flops, "seconds": 0.0 if done else flops / rate})
    return rows


def plan_text(graph: Graph, run_dir: Path) -> str:
    rows = plan_rows(graph, run_dir)
    width = max(len(r["stage"]) for r in rows)
    lines = [f"{'stage':{width}s} {'kind':10s} {'key':16s} {'state':7s} {'FLOPs<=':>9s} {'est. s':>7s}  inputs"]
    for r in rows:
        inputs = ", ".join(f"{role}={src}" for role, src in r["inputs"].items() if not role.startswith("c:"))
        candidates = sum(1 for role in r["inputs"] if role.startswith("c:"))
        if candidates:
            inputs = f"{candidates} candidates" + (f", {inputs}" if inputs else "")
        lines.append(f"{r['stage']:{width}s} {r['kind']:10s} {r['key']:16s} {'done' if r['done'] else 'to run':7s} "
                     f"{r['flops']:9.2e} {r['seconds']:7.0f}  {inputs}")
    todo = [r for r in rows if not r["done"]]
    minutes, jobs = sum(r["seconds"] for r in todo) / 60, default_jobs()
    side_by_side = f", about {minutes / jobs:.0f} min with `undo run`'s {jobs} jobs here" if jobs > 1 else ""
    lines.append(f"{len(rows)} stages, {len(rows) - len(todo)} done; to run: {sum(r['flops'] for r in todo):.2e} "
                 f"training FLOPs, about {minutes:.0f} min of training one stage at a time{side_by_side} "
                 f"(evaluation not included)")
    return "\n".join(lines)


def plan_json(graph: Graph, run_dir: Path) -> str:
    return json.dumps(plan_rows(graph, run_dir), indent=2)
