"""Stages: plain functions from (config, input artifacts) to an output artifact.

Every stage is cached by a hash of its config and inputs (a second run skips what is
done) and resumable (an interrupted stage continues from its last resume point).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from .artifacts import Artifact
from .config import config_hash, to_dict
from .data import BatchStream, pack_examples
from .experiment import ExperimentConfig
from .models import build_model, count_params, load_model
from .tasks import Task, build_task
from .tokenization import load_tokenizer, train_tokenizer
from .training import lm_loss, train

log = logging.getLogger("undo")


def say(message: str) -> None:
    print(f"[undo] {message}", flush=True)


def make_tokenizer(exp: ExperimentConfig, task: Task) -> PreTrainedTokenizerBase:
    if exp.tokenizer.path:
        return load_tokenizer(exp.tokenizer.path)
    return train_tokenizer(task.tokenizer_corpus(), exp.tokenizer.kind, exp.tokenizer.vocab_size)


def pretrain_stage(exp: ExperimentConfig, run_dir: Path, which: Literal["base", "oracle"]) -> Artifact:
    """`base`: trained on retain + forget data. `oracle`: retain only (perfect data filtering)."""
    art = Artifact(run_dir, which)
    key = config_hash("pretrain", which, exp.seed, exp.task, exp.model, exp.tokenizer, exp.pretrain)
    if art.is_done(key):
        say(f"{which}: cached ({art.dir})")
        return art
    task = build_task(exp.task, exp.seed)
    tok = make_tokenizer(exp, task)
    if exp.model.path:
        model, _ = load_model(exp.model.path)
    else:
        model = build_model(exp.model, tok, seed=exp.seed)
    examples = task.train_examples("retain")
    if which == "base":
        examples = examples + task.train_examples("forget")
        random.Random(exp.seed).shuffle(examples)
    rows = pack_examples(tok, examples, exp.pretrain.seq_len, task.loss_on())
    stream = BatchStream(rows, exp.pretrain.batch_size, seed=exp.seed)
    say(f"{which}: pretraining {count_params(model) / 1e6:.2f}M params for {exp.pretrain.steps} steps "
        f"on {len(examples)} examples ({rows['input_ids'].shape[0]} packed rows)")
    art.resume_dir.parent.mkdir(parents=True, exist_ok=True)
    result = train(model, lm_loss, {"train": stream}, exp.pretrain, seed=exp.seed, resume_dir=art.resume_dir,
                   desc=which)
    t0 = time.time()
    metrics = task.evaluate(model, tok)
    say(f"{which}: done in {result.wall_seconds:.0f}s; " + format_scores(metrics))
    art.write(key, {
        "config": to_dict(exp), "seed": exp.seed, "metrics": metrics,
        "flops": result.flops, "tokens": result.tokens, "steps": result.steps,
        "wall_seconds": result.wall_seconds, "eval_seconds": time.time() - t0,
        "params": count_params(model), "final_loss": result.final_loss,
    }, model=model, tokenizer=tok)
    return art


def format_scores(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.endswith("/acc")] or [k for k in metrics if k.startswith(("forget_", "retain_"))]
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)


def eval_stage(model_path: str, exp: ExperimentConfig) -> dict[str, Any]:
    task = build_task(exp.task, exp.seed)
    model, tok = load_model(model_path)
    return task.evaluate(model, tok)
