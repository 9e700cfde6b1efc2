"""Auxiliary models a method asks for (`Method.aux_models()`), trained and cached as
stages of their own: a "reinforced" model finetuned further on the forget set (Who's Harry
Potter), models trained on the forget set and on disjoint extra data (KGA), one model per
shard of the data (SISA, leave-one-out ensembles). Two methods that ask for the same model
from the same input share one stage (the graph names it by its cache key)."""

from __future__ import annotations

import random
import time

from ..config import from_dict
from ..data import BatchStream, task_rows
from ..models import count_params, fresh_copy, load_model
from ..training import TrainConfig, lm_loss, train
from .base import StageContext, StageOutput

VERSION = 1


def shard_examples(examples: list, shard: list[int] | None, seed: int) -> list:
    """The `index`-th of `count` disjoint shards of a seeded shuffle (all examples without a shard)."""
    examples = list(examples)
    random.Random(seed + 5).shuffle(examples)
    if not shard:
        return examples
    index, count = shard
    return examples[index::count]


def run(ctx: StageContext) -> StageOutput:
    spec, name, task, seed = ctx.params["spec"], ctx.node.name, ctx.task, ctx.exp.seed
    cfg = from_dict(TrainConfig, ctx.params["train"], f"auxiliary model {name}: train")
    model, tok = load_model(ctx.inputs["model"].model_dir)
    if spec["start"] == "random":
        model = fresh_copy(model, seed=seed + 6)
    domains = ["retain", "forget"] if spec["data"] == "all" else [spec["data"]]
    examples = shard_examples([ex for d in domains for ex in task.train_examples(d)], spec["shard"], seed)
    rows = task_rows(tok, task, examples, cfg.seq_len)
    stream = BatchStream(rows, cfg.batch_size, seed=seed + 7, bucket=task.row_format() == "padded")
    shard = f" (shard {spec['shard'][0] + 1} of {spec['shard'][1]})" if spec["shard"] else ""
    ctx.say(f"{name}: training an auxiliary model ({spec['start']} start) on {len(examples)} {spec['data']} "
            f"examples{shard} for {cfg.steps} steps")
    result = train(model, lm_loss, {"train": stream}, cfg, seed=seed, resume_dir=ctx.resume_dir, desc=name)
    t0 = time.time()
    metrics = task.evaluate(model, tok)
    return StageOutput({"spec": spec, "train": ctx.params["train"], "examples": len(examples), "metrics": metrics,
                        "flops": result.flops, "tokens": result.tokens, "steps": result.steps,
                        "wall_seconds": result.wall_seconds, "eval_seconds": time.time() - t0,
                        "params": count_params(model)}, model=model, tokenizer=tok, state_dict=result.full_state_dict)
