"""UNDO: Unlearn, Noise, Distill-on-Outputs (the paper's contribution), as stages.

noise:   on a copy of the unlearned model, theta <- (1 - alpha) * theta + alpha * beta * N for
         every matrix parameter, N drawn like Xavier-uniform initialisation; vector parameters
         (biases, norm scales) only shrink (N = 0). Tied embeddings are one parameter, noised once.
distill: forward KL(teacher || student) on every non-pad token of the unlabelled training
         mixture (forget domain included: no labels needed), teacher logits computed once per
         batch under no_grad, until the student's retain metric is back within a tolerance of
         the teacher's, or a fixed step budget. The stop rule's tolerance is absolute for an
         accuracy-like retain metric and relative for a cross-entropy-like one (`stop_rule: auto`;
         the paper: accuracy within 0.05, CE within 5%). The first step at which the rule held
         is recorded (`recovered_step`, with the FLOPs spent up to it), also when training runs
         on to its budget (`stop_at_recovery: false`); `recovered` means that step exists.
The student is the noised copy (UNDO), a randomly initialised model (Unlearn-and-Distill),
or any model given (e.g. the base model with the oracle as teacher).
"""

from __future__ import annotations

import copy
import math
import random
import time
from typing import Any, Optional

import torch
from transformers import PreTrainedModel

from ..config import from_dict
from ..data import BatchStream, task_rows
from ..errors import UndoError
from ..losses import forward_kl, next_token_positions
from ..models import count_params, fresh_copy, load_model, non_embedding_params
from ..training import LossOutput, TrainConfig, make_accelerator, train
from .base import StageContext, StageOutput

NOISE_VERSION = 1
DISTILL_VERSION = 3  # 3: recovered = the stop rule held at some evaluation (recovered_step, recovered_flops); rule auto


def xavier_uniform_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), fans computed as torch.nn.init does."""
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(p)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(p.shape, generator=generator, dtype=torch.float32) * 2 - 1).mul_(bound).to(p.dtype)


@torch.no_grad()
def noise_(model: torch.nn.Module, alpha: float, beta: float, seed: int) -> torch.nn.Module:
    """Noise `model` in place (call it on a copy). Parameters are visited in a fixed order
    (named_parameters, which yields a tied weight once), so the same seed gives the same noise."""
    if not 0.0 <= alpha <= 1.0:
        raise UndoError(f"alpha {alpha} is outside [0, 1]")
    generator = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.ndim >= 2:
            p.mul_(1 - alpha).add_(alpha * beta * xavier_uniform_like(p, generator).to(p.device))
        else:
            p.mul_(1 - alpha)
    return model


def distill_loss_fn(teacher: PreTrainedModel, temperature: float):
    """Forward KL(teacher || student) at every position that predicts a non-pad token (the
    attention mask shifted like the logits); the teacher runs once per batch."""
    teacher_params = non_embedding_params(teacher)

    def loss_fn(student: torch.nn.Module, batches: dict[str, dict[str, torch.Tensor]]) -> LossOutput:
        batch = batches["train"]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = forward_kl(teacher_logits, student_logits, next_token_positions(batch["attention_mask"]), temperature)
        tokens = batch["input_ids"].numel()
        return LossOutput(loss, {"kl": loss.item()}, extra_flops=2.0 * teacher_params * tokens)

    return loss_fn


def stop_rule_for(rule: str, higher_is_better: bool) -> str:
    """What `auto` stands for: an accuracy-like metric (higher is better, bounded) recovers within an
    absolute tolerance; a cross-entropy-like one, whose scale depends on the task, within a relative one."""
    if rule != "auto":
        return rule
    return "absolute" if higher_is_better else "relative"


def stop_metric(task: Any, teacher_quick: dict[str, float]) -> tuple[str, bool]:
    """The retain metric the stop rule checks and whether higher is better: the task's own, or its
    accuracy when the quick evaluation has no cross-entropy."""
    if task.retain_metric in teacher_quick:
        return task.retain_metric, task.higher_is_better
    fallback = task.retain_metric.replace("_ce", "_acc")
    if fallback not in teacher_quick:
        raise UndoError(f"the task's quick evaluation has neither {task.retain_metric} nor {fallback}; "
                        f"the distillation's stop rule needs one of them")
    return fallback, True


def recovered_at(history: list[dict[str, Any]], eval_flops: list[float], check: Any,
                 key: str) -> tuple[Optional[int], Optional[float]]:
    """The first evaluated step at which the stop rule held, and the FLOPs spent up to it (None, None: never)."""
    for i, entry in enumerate(history):
        if key in entry and check(entry, key):
            return int(entry["step"]), (eval_flops[i] if i < len(eval_flops) else None)
    return None, None


def retain_recovered(rule: str, tolerance: float, higher_is_better: bool, teacher_value: float):
    """The paper's stop rule: the student's retain metric is back within `tolerance` of the teacher's."""
    def check(metrics: dict[str, float], key: str) -> bool:
        value = metrics[key]
        if rule == "none":
            return False
        gap = (teacher_value - value) if higher_is_better else (value - teacher_value)
        if rule == "relative":
            return gap <= tolerance * abs(teacher_value)
        return gap <= tolerance
    return check


def noise_run(ctx: StageContext) -> StageOutput:
    """`undo noise`: a noised copy of the "model" input as an artifact of its own."""
    p = ctx.params
    model, tok = load_model(ctx.inputs["model"].model_dir)
    noise_(model, p["alpha"], p["beta"], p["noise_seed"])
    return StageOutput({"alpha": p["alpha"], "beta": p["beta"], "noise_seed": p["noise_seed"],
                        "source": str(ctx.inputs["model"].model_dir), "flops": 0.0}, model=model, tokenizer=tok)


def make_student(ctx: StageContext, teacher: PreTrainedModel) -> PreTrainedModel:
    p, seed = ctx.params, ctx.exp.seed
    if p["student"] == "noised":
        return noise_(copy.deepcopy(teacher).requires_grad_(True), p["alpha"], p["beta"], seed=seed + 1)
    if p["student"] == "random":
        return fresh_copy(teacher, seed=seed + 2)
    if "student" not in ctx.inputs:
        raise UndoError(f"{ctx.node.name}: student 'model' needs a student checkpoint (--student-model PATH)")
    return load_model(ctx.inputs["student"].model_dir)[0]


def distill_stream(ctx: StageContext, tok, cfg: TrainConfig) -> BatchStream:
    """The unlabelled training mixture (or retain data): KL falls on every non-pad token."""
    task, seed = ctx.task, ctx.exp.seed
    examples = task.train_examples("retain")
    if ctx.params["data"] == "mixture":
        examples = examples + task.train_examples("forget")
        random.Random(seed + 3).shuffle(examples)
    rows = task_rows(tok, task, examples, cfg.seq_len, "all")  # labels unused: KL on all non-pad tokens
    return BatchStream(rows, cfg.batch_size, seed=seed + 4, bucket=task.row_format() == "padded")


def distill_run(ctx: StageContext) -> StageOutput:
    """Distill the "teacher" input's outputs into a student (noised copy, random, or given)."""
    p, task, name = ctx.params, ctx.task, ctx.node.name
    cfg = from_dict(TrainConfig, p["train"], f"{name}: distill")
    teacher, tok = load_model(ctx.inputs["teacher"].model_dir)
    teacher.eval().requires_grad_(False)
    model = make_student(ctx, teacher)
    acc = make_accelerator(cfg)  # the teacher must sit on the same device as the student
    teacher.to(acc.device)
    model.to(acc.device).train()
    stream = distill_stream(ctx, tok, cfg)
    teacher_quick = task.evaluate(teacher, tok, quick=True)
    key_metric, higher = stop_metric(task, teacher_quick)
    rule, stop = stop_rule_for(p["stop_rule"], higher), p.get("stop_at_recovery", True)
    recovered = retain_recovered(rule, p["stop_tolerance"], higher, teacher_quick[key_metric])
    within = f"{p['stop_tolerance'] * 100:g}%" if rule == "relative" else f"{p['stop_tolerance']:g}"
    alpha = f" (alpha={p['alpha']:g})" if p["student"] == "noised" else ""
    ctx.say(f"{name}: distilling into a {p['student']} student{alpha} for up to {cfg.steps} steps; "
            f"{'stop' if stop else 'record the step'} when {key_metric} is within {within} of the teacher's "
            f"{teacher_quick[key_metric]:.3f}")
    result = train(model, distill_loss_fn(teacher, p["temperature"]), {"train": stream}, cfg, seed=ctx.exp.seed,
                   resume_dir=ctx.resume_dir, evaluate=lambda m: task.evaluate(m, tok, quick=True),
                   should_stop=(lambda m: recovered(m, key_metric)) if stop else None, desc=name, accelerator=acc)
    recovered_step, recovered_flops = recovered_at(result.history, result.eval_flops, recovered, key_metric)
    model = acc.unwrap_model(model)
    t0 = time.time()
    metrics = task.evaluate(model, tok)
    ctx.say(f"{name}: {result.steps} steps in {result.wall_seconds:.0f}s "
            f"({'never recovered' if recovered_step is None else f'recovered at step {recovered_step}'}); "
            f"{task.retain_metric}={metrics[task.retain_metric]:.3f} {task.forget_metric}={metrics[task.forget_metric]:.3f}")
    return StageOutput({
        "teacher": str(ctx.inputs["teacher"].model_dir), "student": p["student"], "alpha": p["alpha"],
        "beta": p["beta"], "train": p["train"], "seed": ctx.exp.seed, "metrics": metrics,
        "teacher_quick_metrics": teacher_quick, "history": result.history, "flops": result.flops,
        "tokens": result.tokens, "steps": result.steps, "recovered": recovered_step is not None,
        "recovered_step": recovered_step, "recovered_flops": recovered_flops, "stopped_early": result.stopped_early,
        "stop_rule": rule, "stop_tolerance": p["stop_tolerance"], "stop_metric": key_metric,
        "wall_seconds": result.wall_seconds, "eval_seconds": time.time() - t0, "params": count_params(model),
    }, model=model, tokenizer=tok, state_dict=result.full_state_dict)
