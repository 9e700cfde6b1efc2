"""Starting models: pretrain on the task's data (base: retain + forget; oracle: retain only,
i.e. perfect data filtering), or take a checkpoint from disk as it is."""

from __future__ import annotations

import random
import time

from transformers import PreTrainedTokenizerBase

from ..config import from_dict
from ..corpora import check_encodes, check_seq_len
from ..data import BatchStream, task_rows
from ..models import build_model, count_params, load_model
from ..tasks import Task
from ..tokenization import load_tokenizer, train_tokenizer
from ..training import TrainConfig, lm_loss, train
from .base import StageContext, StageOutput

VERSION = 1  # bump when pretraining's semantics change: every cached pretrain stage reruns


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
    """Pretrain `ctx.node.name` on `data` ("all" = retain + forget, "retain" = the oracle's)."""
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
    stream = BatchStream(rows, cfg.batch_size, seed=exp.seed, bucket=task.row_format() == "padded")
    ctx.say(f"{name}: pretraining {count_params(model) / 1e6:.2f}M params for {cfg.steps} steps "
            f"on {len(examples)} examples ({rows['input_ids'].shape[0]} rows of {task.row_format()} data)")
    result = train(model, lm_loss, {"train": stream}, cfg, seed=exp.seed, resume_dir=ctx.resume_dir, desc=name)
    t0 = time.time()
    metrics = task.evaluate(model, tok)
    ctx.say(f"{name}: done in {result.wall_seconds:.0f}s; " + format_scores(metrics))
    return StageOutput({
        "data": ctx.params["data"], "seed": exp.seed, "metrics": metrics, "train": ctx.params["train"],
        "flops": result.flops, "tokens": result.tokens, "steps": result.steps,
        "wall_seconds": result.wall_seconds, "eval_seconds": time.time() - t0,
        "params": count_params(model), "final_loss": result.final_loss,
    }, model=model, tokenizer=tok, state_dict=result.full_state_dict)


def run_checkpoint(ctx: StageContext) -> StageOutput:
    """A starting model given as a checkpoint: evaluated, not copied (the sidecar points to it)."""
    path = ctx.params["path"]
    model, tok = load_model(path)
    t0 = time.time()
    metrics = ctx.task.evaluate(model, tok)
    ctx.say(f"{ctx.node.name}: checkpoint {path}; " + format_scores(metrics))
    return StageOutput({"model_path": str(path), "seed": ctx.exp.seed, "metrics": metrics, "flops": 0.0,
                        "wall_seconds": 0.0, "eval_seconds": time.time() - t0, "params": count_params(model)})
