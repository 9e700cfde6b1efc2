"""Starting models: pretrain on the task's data (base: retain + forget; oracle: retain only,
i.e. perfect data filtering), or take a checkpoint from disk as it is."""

from __future__ import annotations

import dataclasses
import random
import shutil
import time

from transformers import PreTrainedTokenizerBase

from .. import distributed
from ..config import from_dict
from ..corpora import check_encodes, check_seq_len
from ..data import BatchStream, task_rows
from ..errors import UndoError
from ..models import build_model, count_params, load_model
from ..tasks import Task
from ..tokenization import load_tokenizer, train_tokenizer
from ..training import TrainConfig, lm_loss, train
from .base import StageContext, StageOutput

VERSION = 2  # bump when pretraining's semantics change: every cached pretrain stage reruns
# 2: the quality gate (extra chunks, quality_gate_ok); arithmetic eval facts withheld from every format


def make_tokenizer(exp, task: Task) -> PreTrainedTokenizerBase:
    """The experiment's tokenizer: a given directory, the model's own, or one trained on the task."""
    if exp.tokenizer.path:
        return load_tokenizer(exp.tokenizer.path)
    if exp.model.path:
        return load_tokenizer(exp.model.path)
    return train_tokenizer(task.tokenizer_corpus(), exp.tokenizer.kind, exp.tokenizer.vocab_size,
                           split_digits=exp.tokenizer.split_digits)


def format_scores(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.endswith("/acc")] or [k for k in metrics if k.startswith(("forget_", "retain_"))]
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)


def run(ctx: StageContext) -> StageOutput:
    """Pretrain `ctx.node.name` on `data` ("all" = retain + forget, "retain" = the oracle's), then
    hold it to the task's quality gate: below it, train on in chunks (`quality_gate`)."""
    exp, task, name = ctx.exp, ctx.task, ctx.node.name
    cfg = from_dict(TrainConfig, ctx.params["train"], f"models.{name}.train")
    tok = make_tokenizer(exp, task)
    model = load_model(exp.model.path)[0] if exp.model.path else build_model(exp.model, tok, seed=exp.seed)
    check_seq_len(model, cfg.seq_len, "pretrain.seq_len")
    examples = task.train_examples("retain")
    check_encodes(tok, [ex.prompt + ex.completion for ex in examples[:200]], "training text")
    if ctx.params["data"] == "all":
        examples = examples + task.train_examples("forget")
        random.Random(exp.seed).shuffle(examples)
    rows = task_rows(tok, task, examples, cfg.seq_len)
    bucket = task.row_format() == "padded"
    stream = BatchStream(rows, cfg.batch_size, seed=exp.seed, bucket=bucket)
    ctx.say(f"{name}: pretraining {count_params(model) / 1e6:.2f}M params for {cfg.steps} steps "
            f"on {len(examples)} examples ({rows['input_ids'].shape[0]} rows of {task.row_format()} data)")
    phases = [train(model, lm_loss, {"train": stream}, cfg, seed=exp.seed, resume_dir=ctx.resume_dir, desc=name)]
    t0 = time.time()
    metrics = task.evaluate(model, tok)
    eval_seconds = time.time() - t0
    gate = ctx.params.get("quality_gate") or {}
    missed = task.quality_gate(metrics, ctx.params["data"])
    history = [{"step": phases[0].steps, "missed": missed}]
    steps = phases[0].steps
    while missed and steps < gate.get("max_steps", 0):
        # A warm restart: the same schedule again over the chunk, on a differently shuffled stream;
        # each chunk has its own resume point (inside this stage's), so a killed run resumes.
        k, chunk = len(phases), min(gate["extend_steps"], gate["max_steps"] - steps)
        ctx.say(f"{name}: below the quality gate after {steps} steps ({'; '.join(missed)}); training {chunk} more")
        extra = dataclasses.replace(cfg, steps=chunk, warmup_steps=min(cfg.warmup_steps, chunk))
        chunk_stream = BatchStream(rows, cfg.batch_size, seed=exp.seed + 7919 * k, bucket=bucket)
        phases.append(train(model, lm_loss, {"train": chunk_stream}, extra, seed=exp.seed + k,
                            resume_dir=ctx.resume_dir / f"extra{k}", desc=f"{name} +{k}"))
        steps += phases[-1].steps
        t0 = time.time()
        metrics = task.evaluate(model, tok)
        eval_seconds += time.time() - t0
        missed = task.quality_gate(metrics, ctx.params["data"])
        history.append({"step": steps, "missed": missed})
    wall = sum(p.wall_seconds for p in phases)
    ctx.say(f"{name}: done in {wall:.0f}s, {steps} steps; " + format_scores(metrics))
    check_gate(ctx, task, missed, f"after {steps} pretraining steps",
               "raise quality_gate.max_steps (more extra chunks) or pretrain.steps")
    metrics["quality_gate_ok"] = float(not missed)
    return StageOutput({
        "data": ctx.params["data"], "seed": exp.seed, "metrics": metrics, "train": ctx.params["train"],
        "flops": sum(p.flops for p in phases), "tokens": sum(p.tokens for p in phases), "steps": steps,
        "wall_seconds": wall, "eval_seconds": eval_seconds,
        "params": count_params(model), "final_loss": phases[-1].final_loss,
        "quality_gate": {"ok": not missed, "missed": missed, "checks": history},
    }, model=model, tokenizer=tok, state_dict=phases[-1].full_state_dict)


def check_gate(ctx: StageContext, task: Task, missed: list[str], when: str, fix: str) -> None:
    """A starting model below its task's quality gate: one clear line (`on_miss: fail`, the
    stage's resume points removed: nothing half-written stays), or a note (`mark`)."""
    if not missed:
        return
    what = f"{ctx.node.id}: below the {task.name} quality gate {when}: {'; '.join(missed)}"
    if (ctx.params.get("quality_gate") or {}).get("on_miss", "mark") == "fail":
        if distributed.is_main_process():
            shutil.rmtree(ctx.resume_dir, ignore_errors=True)
        raise UndoError(f"{what}. Every result built on it would be void; {fix}, "
                        f"or set quality_gate.on_miss=mark to go on with the run marked")
    ctx.say(f"{what}; going on (quality_gate.on_miss: mark): the report marks this run")


def run_checkpoint(ctx: StageContext) -> StageOutput:
    """A starting model given as a checkpoint: evaluated, not copied (the sidecar points to it)."""
    path = ctx.params["path"]
    model, tok = load_model(path)
    t0 = time.time()
    metrics = ctx.task.evaluate(model, tok)
    ctx.say(f"{ctx.node.name}: checkpoint {path}; " + format_scores(metrics))
    missed = ctx.task.quality_gate(metrics, ctx.params.get("data", "all"))
    check_gate(ctx, ctx.task, missed, f"(checkpoint {path})", "give a checkpoint that knows the task")
    metrics["quality_gate_ok"] = float(not missed)
    return StageOutput({"model_path": str(path), "seed": ctx.exp.seed, "metrics": metrics, "flops": 0.0,
                        "wall_seconds": 0.0, "eval_seconds": time.time() - t0, "params": count_params(model)})
