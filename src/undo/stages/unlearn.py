"""The unlearn stage: apply one method to a model.

    <run_dir>/seed<s>/unlearn/<name>/model        the unlearned checkpoint
    <run_dir>/seed<s>/unlearn/<name>/result.json  method, options, train config, metrics before/after,
                                                  FLOPs, wall time, which frozen models were loaded

Inputs (roles): "model" (the starting model), "teacher" for methods that need one
(oracle matching), and "aux:<name>" for each auxiliary model the method declares
(`Method.aux_models()`), which the engine trains and caches as stages of their own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..artifacts import Artifact, ModelDir
from ..config import from_dict, to_dict
from ..data import BatchStream, extra_examples, pad_batch, task_rows
from ..errors import UndoError
from ..methods.base import Method, build_method
from ..methods.idkdpo import idk_examples
from ..models import count_params, load_model
from ..tasks import Task
from ..training import TrainConfig, make_accelerator, train
from .base import StageContext, StageOutput

VERSION = 2  # 2: rows are bucketed by length (other batches than version 1's); oracle matching's KL mask is shifted


def train_config(method: Method, train_overrides: dict[str, Any], where: str) -> TrainConfig:
    """TrainConfig defaults < the method's defaults < the recipe's overrides."""
    return from_dict(TrainConfig, {**method.train_defaults, **train_overrides}, f"unlearn {where}: train")


def load_frozen(path: Path, device: torch.device) -> PreTrainedModel:
    model, _ = load_model(path)
    model.requires_grad_(False)
    return model.eval().to(device)


def make_rows(tok: PreTrainedTokenizerBase, task: Task, examples: list, method: Method, cfg: TrainConfig) -> dict:
    """Rows in the task's format, or one example per row where the method's loss is per sequence."""
    if method.row_format == "padded":
        return pad_batch(tok, examples, task.loss_on(), max_len=cfg.seq_len)
    return task_rows(tok, task, examples, cfg.seq_len)


def build_streams(task: Task, tok: PreTrainedTokenizerBase, method: Method, cfg: TrainConfig,
                  seed: int) -> dict[str, BatchStream]:
    """The data streams `method.needs()` names. Rows are bucketed by length, so a batch is
    trimmed to little padding (it was ~45% of an arithmetic batch of one-example rows and
    ~25% of a batch of packed text rows; now 3-6%). The idk stream has the forget stream's rows
    count, seed and bucket order, so row i of every idk batch answers row i of the forget batch.
    "update" (knowledge editing, F-Learning): the task's updated facts, `task.updated_facts("new")`;
    a method that needs only them (no "forget") gets no forget stream. "contrast" (PCGU): the task's
    `contrast_examples` of the forget examples, aligned row for row as the idk stream is."""
    needs = method.needs()
    forget = task.train_examples("forget")
    if "spans" in needs and not hasattr(task, "span_rows"):
        raise UndoError(f"method '{method.name}' needs sensitive spans, which task '{task.name}' does not mark; "
                        f"use task privacy (or the method's online spans)")
    streams = {}
    if "forget" in needs:
        # "spans": the forget rows with the task's sensitive-token mask (SeUL's offline spans)
        forget_rows = (task.span_rows(tok, forget, cfg.seq_len) if "spans" in needs
                       else make_rows(tok, task, forget, method, cfg))
        streams["forget"] = BatchStream(forget_rows, cfg.batch_size, seed, bucket=True)
    if "retain" in needs:
        retain = task.train_examples("retain")
        streams["retain"] = BatchStream(make_rows(tok, task, retain, method, cfg), cfg.batch_size, seed + 1, bucket=True)
    if "idk" in needs:
        if method.row_format != "padded":
            raise UndoError(f"method '{method.name}' pairs idk answers with forget examples; it needs row_format 'padded'")
        idk = make_rows(tok, task, idk_examples(forget, seed), method, cfg)
        streams["idk"] = BatchStream(idk, cfg.batch_size, seed, bucket=True, lengths=streams["forget"].lengths)
    if "update" in needs:
        if not hasattr(task, "updated_facts"):
            raise UndoError(f"method '{method.name}' learns updated facts, which task '{task.name}' does not have; "
                            f"use task facts with task.options.update_attributes")
        updates = make_rows(tok, task, task.updated_facts("new"), method, cfg)
        streams["update"] = BatchStream(updates, cfg.batch_size, seed + 2, bucket=True)
    if "extra" in needs:  # KGA's D_n: the task's data disjoint from all training data
        extra = make_rows(tok, task, extra_examples(task), method, cfg)
        streams["extra"] = BatchStream(extra, cfg.batch_size, seed + 3, bucket=True)
    if "contrast" in needs:  # PCGU: row i of every contrast batch is row i of the forget batch with the other group
        if not hasattr(task, "contrast_examples") or method.row_format != "padded":
            raise UndoError(f"method '{method.name}' needs each forget example's contrast, which task '{task.name}' "
                            f"does not give (or rows are not padded); use task bias")
        contrast = make_rows(tok, task, task.contrast_examples(forget), method, cfg)
        streams["contrast"] = BatchStream(contrast, cfg.batch_size, seed, bucket=True, lengths=streams["forget"].lengths)
    streams.update(method.own_streams(cfg, seed))  # e.g. Quark's pool of sampled responses
    return streams


def headline(task: Task | type[Task], metrics: dict[str, float]) -> tuple[float, float]:
    """(forget, retain) headline metric values."""
    return metrics[task.forget_metric], metrics[task.retain_metric]


def metrics_before(source: Artifact | ModelDir, exp, task: Task, model: PreTrainedModel,
                   tok: PreTrainedTokenizerBase) -> dict[str, float]:
    """The input model's metrics: from its sidecar when it was evaluated on this task and seed, else measured."""
    result = source.result() or {}
    metrics = result.get("metrics")
    if metrics and result.get("task") == to_dict(exp.task) and result.get("seed") == exp.seed:
        return metrics
    return task.evaluate(model, tok)


def attach_frozen(method: Method, ctx: StageContext, device: torch.device) -> list[str]:
    """Load the frozen models `needs()` names and the auxiliary models, and hand them over."""
    needs = method.needs()
    if "teacher" in needs and "teacher" not in ctx.inputs:
        raise UndoError(f"method '{method.name}' needs a teacher model (the oracle); pass --teacher PATH")
    reference = load_frozen(ctx.inputs["model"].model_dir, device) if "reference" in needs else None
    teacher = load_frozen(ctx.inputs["teacher"].model_dir, device) if "teacher" in needs else None
    aux = {role[4:]: load_frozen(src.model_dir, device) for role, src in ctx.inputs.items() if role.startswith("aux:")}
    method.attach(reference=reference, teacher=teacher, aux=aux)
    return [n for n, m in (("reference", reference), ("teacher", teacher)) if m is not None] + sorted(aux)


def run(ctx: StageContext) -> StageOutput:
    """Unlearn with the node's method from the "model" input; returns the unlearned model."""
    exp, task, p, name = ctx.exp, ctx.task, ctx.params, ctx.node.name
    method = build_method(p["method"], p["options"], exp.task.name, exp.seed)
    cfg = train_config(method, p["train"], name)
    if method.step_hook() is not None and cfg.grad_accum != 1:
        raise UndoError(f"method '{method.name}' takes several gradients per step; set train.grad_accum=1")
    source = ctx.inputs["model"]
    model, tok = load_model(source.model_dir)
    acc = make_accelerator(cfg)
    model.to(acc.device)  # evaluate before training on the accelerator too
    loaded = attach_frozen(method, ctx, acc.device)
    method.prepare(model)
    model = method.adapt(model)
    method.bind_task(task, tok)
    streams = build_streams(task, tok, method, cfg, exp.seed)
    method.locate(model, streams)  # e.g. mechanistic unlearning: which components train
    params = method.trainable_parameters(model)
    chosen = {id(p) for p in params}
    for q in model.parameters():  # frozen parts get no gradients at all (faster, and DDP-safe)
        q.requires_grad_(id(q) in chosen)
    t0 = time.time()
    before = metrics_before(source, exp, task, model, tok)
    eval_seconds = time.time() - t0
    ctx.say(f"unlearn {name}: {method.name} for {cfg.steps} steps at lr {cfg.lr:g}, training "
            f"{sum(q.numel() for q in params) / 1e6:.2f}M of {count_params(model) / 1e6:.2f}M params"
            + (f"; frozen: {', '.join(loaded)}" if loaded else ""))
    evaluate = (lambda m: task.evaluate(m, tok, quick=True)) if cfg.eval_every else None
    result = train(model, method.loss, streams, cfg, seed=exp.seed, resume_dir=ctx.resume_dir, params=params,
                   desc=f"unlearn {name}", accelerator=acc, step_hook=method.step_hook(), evaluate=evaluate,
                   on_start=method.start, on_end=method.finish, stop_after_step=method.stop_after_step,
                   should_stop=method.stop_on_eval)
    model = method.export(acc.unwrap_model(model))
    report = method.report()  # work the method did outside the loop (SISA's shard retraining) counts too
    t1 = time.time()
    after = {**task.evaluate(model, tok), **report.get("metrics", {})}  # + what only the method knows (SISA's cost)
    eval_seconds += time.time() - t1
    (f0, r0), (f1, r1) = headline(task, before), headline(task, after)
    ctx.say(f"unlearn {name}: {task.forget_metric} {f0:.3f} -> {f1:.3f}, {task.retain_metric} {r0:.3f} -> {r1:.3f} "
            f"({result.wall_seconds:.0f}s)")
    return StageOutput({
        "method": method.name, "options": to_dict(method.options), "train": to_dict(cfg),
        "seed": exp.seed, "task": to_dict(exp.task), "source": str(source.model_dir),
        "needs": sorted(method.needs()), "frozen_models_loaded": loaded,
        "metrics_before": before, "metrics": after,
        "forget_metric": task.forget_metric, "retain_metric": task.retain_metric,
        "higher_is_better": task.higher_is_better,
        "flops": result.flops + report.get("flops", 0.0), "tokens": result.tokens + report.get("tokens", 0),
        "steps": result.steps + report.get("steps", 0), "stopped_early": result.stopped_early,
        "wall_seconds": result.wall_seconds + report.get("wall_seconds", 0.0), "eval_seconds": eval_seconds,
        "history": result.history, "trainable_params": sum(q.numel() for q in params), "final_loss": result.final_loss,
        **({"method_report": report} if report else {}),
    }, model=model, tokenizer=tok, state_dict=result.full_state_dict)
