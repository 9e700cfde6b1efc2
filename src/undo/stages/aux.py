"""Auxiliary models a method asks for (`Method.aux_models()`), trained and cached as
stages of their own: a "reinforced" model finetuned further on the forget set (Who's Harry
Potter), models trained on the forget set and on disjoint extra data (KGA), one model per
shard of the data (SISA, leave-one-out ensembles). Two methods that ask for the same model
from the same input share one stage (the graph names it by its cache key)."""

from __future__ import annotations

import time
import warnings

import torch

from ..config import from_dict
from ..data import aux_examples, aux_stream, up_to_slice
from ..errors import UndoError
from ..models import count_params, fresh_copy, load_model
from ..training import TrainConfig, lm_loss, train
from .base import StageContext, StageOutput

VERSION = 2  # 2: shards split distinct examples (copies stay together)


def with_lora(model: torch.nn.Module, rank: int, alpha: float, seed: int) -> torch.nn.Module:
    """`model` with fresh LoRA adapters (peft) on every linear layer but the head, base weights
    frozen; B = 0, so it computes what `model` did (as the relearn_lora attack's adapters)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' A matrices
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                target_modules="all-linear", bias="none"))


def run(ctx: StageContext) -> StageOutput:
    spec, name, task, seed = ctx.params["spec"], ctx.node.name, ctx.task, ctx.exp.seed
    cfg = from_dict(TrainConfig, ctx.params["train"], f"auxiliary model {name}: train")
    model, tok = load_model(ctx.inputs["model"].model_dir)
    if spec["start"] == "random":
        model = fresh_copy(model, seed=seed + 6)
    examples = up_to_slice(aux_examples(task, spec["data"], spec["shard"], seed), spec.get("slice"))
    if not examples:
        raise UndoError(f"auxiliary model {name}: its shard (or slice) of the data is empty; use fewer shards or slices")
    stream = aux_stream(tok, task, examples, cfg.batch_size, cfg.seq_len, seed)
    shard = f" (shard {spec['shard'][0] + 1} of {spec['shard'][1]})" if spec["shard"] else ""
    if spec.get("slice"):
        shard += f" (slices 1-{spec['slice'][0] + 1} of {spec['slice'][1]})"
    ctx.say(f"{name}: training an auxiliary model ({spec['start']} start) on {len(examples)} {spec['data']} "
            f"examples{shard} for {cfg.steps} steps")
    lora = spec.get("lora")  # (rank, alpha): only adapters learn; merged, the change is their product
    if lora:
        model = with_lora(model, int(lora[0]), float(lora[1]), seed + 8)
    result = train(model, lm_loss, {"train": stream}, cfg, seed=seed, resume_dir=ctx.resume_dir, desc=name)
    if lora:
        model = model.merge_and_unload()
    t0 = time.time()
    # An auxiliary model's numbers are for a reader's check only; where there are many (SISA's
    # shards x slices), a full evaluation of each costs more than its training: `quick_eval`.
    metrics = task.evaluate(model, tok, quick=bool(spec.get("quick_eval")))
    return StageOutput({"spec": spec, "train": ctx.params["train"], "examples": len(examples), "metrics": metrics,
                        "flops": result.flops, "tokens": result.tokens, "steps": result.steps,
                        "wall_seconds": result.wall_seconds, "eval_seconds": time.time() - t0,
                        "params": count_params(model)}, model=model, tokenizer=tok, state_dict=result.full_state_dict)
