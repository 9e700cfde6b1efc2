"""UNDO: Unlearn, Noise, Distill-on-Outputs (the paper's contribution), as stages.

noise:   on a copy of the unlearned model, theta <- (1 - alpha) * theta + alpha * beta * N for
         every matrix parameter, N drawn like Xavier-uniform initialisation; vector parameters
         (biases, norm scales) only shrink (N = 0). Tied embeddings are one parameter, noised once.
distill: forward KL(teacher || student) on every non-pad token of the unlabelled training
         mixture (forget domain included: no labels needed), teacher logits computed once per
         batch under no_grad, until the student's retain metric is back within a tolerance of
         the teacher's, or a fixed step budget.
The student is the noised copy (UNDO), a randomly initialised model (Unlearn-and-Distill),
or any model given (e.g. the base model with the oracle as teacher).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import PreTrainedModel

from .artifacts import Artifact, source_key
from .config import config_hash, to_dict
from .data import BatchStream, task_rows
from .errors import UndoError
from .losses import forward_kl
from .models import count_params, fresh_copy, load_model, non_embedding_params
from .tasks import build_task
from .training import LossOutput, TrainConfig, make_accelerator, train


def _distill_default() -> TrainConfig:
    return TrainConfig(steps=1000, lr=2e-3, schedule="cosine", warmup_steps=20, eval_every=25)


@dataclasses.dataclass
class UndoConfig:
    teacher: str = "auto"               # a method run's name, or "auto" (the selected teacher)
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.6, 0.8])
    beta: float = 0.1                   # paper: 0.1 on synthetic tasks, 0 (pure shrink) for WMDP
    temperature: float = 1.0
    data: Literal["mixture", "retain"] = "mixture"  # what the student is distilled on
    stop_rule: Literal["absolute", "relative", "none"] = "absolute"
    stop_tolerance: float = 0.05        # absolute: |teacher - student| retain metric; relative: fraction
    distill: TrainConfig = dataclasses.field(default_factory=_distill_default)
    unlearn_and_distill: bool = True    # also distill into a randomly initialised student
    unlearn_and_distill_steps: Optional[int] = None  # budget for it (default: distill.steps)

    def validate(self, where: str) -> None:
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise UndoError(f"{where}.alphas: alpha {a} is outside [0, 1]")
        if self.temperature <= 0:
            raise UndoError(f"{where}.temperature must be > 0")


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
    """Forward KL(teacher || student) over non-pad tokens; the teacher runs once per batch."""
    teacher_params = non_embedding_params(teacher)

    def loss_fn(student: torch.nn.Module, batches: dict[str, dict[str, torch.Tensor]]) -> LossOutput:
        batch = batches["train"]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = forward_kl(teacher_logits, student_logits, batch["attention_mask"].bool(), temperature)
        tokens = batch["input_ids"].numel()
        return LossOutput(loss, {"kl": loss.item()}, extra_flops=2.0 * teacher_params * tokens)

    return loss_fn


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


def noise_stage(teacher_art: Artifact, run_dir: Path, name: str, alpha: float, beta: float, seed: int) -> Artifact:
    """`undo noise`: write a noised copy of a checkpoint as its own artifact."""
    art = Artifact(run_dir, name)
    key = config_hash("noise", source_key(teacher_art), alpha, beta, seed)
    if art.is_done(key):
        return art
    model, tok = load_model(teacher_art.model_dir)
    noise_(model, alpha, beta, seed)
    art.write(key, {"alpha": alpha, "beta": beta, "seed": seed, "source": str(teacher_art.model_dir)},
              model=model, tokenizer=tok)
    return art


def distill_stage(exp, run_dir: Path, name: str, teacher_art: Artifact, student: Literal["noised", "random", "model"],
                  cfg: UndoConfig, alpha: float = 0.0, student_art: Optional[Artifact] = None,
                  steps: Optional[int] = None, say=print) -> Artifact:
    """Distill the teacher's outputs into a student; cached and resumable like every stage."""
    art = Artifact(run_dir, name)
    train_cfg = dataclasses.replace(cfg.distill, steps=steps if steps is not None else cfg.distill.steps)
    key = config_hash("distill", name, source_key(teacher_art),
                      source_key(student_art) if student_art else None,
                      student, alpha, cfg.beta, cfg.temperature, cfg.data, cfg.stop_rule, cfg.stop_tolerance,
                      train_cfg, exp.seed, exp.task)
    if art.is_done(key):
        say(f"{name}: cached ({art.dir})")
        return art
    task = build_task(exp.task, exp.seed)
    teacher, tok = load_model(teacher_art.model_dir)
    teacher.eval().requires_grad_(False)
    if student == "noised":
        model = noise_(copy.deepcopy(teacher).requires_grad_(True), alpha, cfg.beta, seed=exp.seed + 1)
    elif student == "random":
        model = fresh_copy(teacher, seed=exp.seed + 2)
    else:
        if student_art is None:
            raise UndoError(f"{name}: student 'model' needs a student checkpoint")
        model, _ = load_model(student_art.model_dir)
    acc = make_accelerator(train_cfg)  # the teacher must sit on the same device as the student
    teacher.to(acc.device)
    model.to(acc.device).train()

    examples = task.train_examples("retain")
    if cfg.data == "mixture":
        examples = examples + task.train_examples("forget")
        random.Random(exp.seed + 3).shuffle(examples)
    rows = task_rows(tok, task, examples, train_cfg.seq_len, "all")  # labels unused: KL on all non-pad tokens
    stream = BatchStream(rows, train_cfg.batch_size, seed=exp.seed + 4, bucket=task.row_format() == "padded")

    teacher_quick = task.evaluate(teacher, tok, quick=True)
    key_metric = task.retain_metric if task.retain_metric in teacher_quick else task.retain_metric.replace("_ce", "_acc")
    recovered = retain_recovered(cfg.stop_rule, cfg.stop_tolerance, task.higher_is_better, teacher_quick[key_metric])
    within = f"{cfg.stop_tolerance * 100:g}%" if cfg.stop_rule == "relative" else f"{cfg.stop_tolerance:g}"
    say(f"{name}: distilling into a {student} student (alpha={alpha:g}) for up to {train_cfg.steps} steps; "
        f"stop when {key_metric} is within {within} of the teacher's {teacher_quick[key_metric]:.3f}")
    art.resume_dir.parent.mkdir(parents=True, exist_ok=True)
    result = train(model, distill_loss_fn(teacher, cfg.temperature), {"train": stream}, train_cfg, seed=exp.seed,
                   resume_dir=art.resume_dir, evaluate=lambda m: task.evaluate(m, tok, quick=True),
                   should_stop=lambda m: recovered(m, key_metric), desc=name, accelerator=acc)
    model = acc.unwrap_model(model)
    t0 = time.time()
    metrics = task.evaluate(model, tok)
    say(f"{name}: {result.steps} steps in {result.wall_seconds:.0f}s "
        f"({'recovered' if result.stopped_early else 'budget reached'}); "
        f"{task.retain_metric}={metrics[task.retain_metric]:.3f} {task.forget_metric}={metrics[task.forget_metric]:.3f}")
    art.write(key, {
        "teacher": str(teacher_art.model_dir), "student": student, "alpha": alpha, "beta": cfg.beta,
        "config": to_dict(cfg), "train": to_dict(train_cfg), "seed": exp.seed, "metrics": metrics,
        "teacher_quick_metrics": teacher_quick, "history": result.history, "flops": result.flops,
        "tokens": result.tokens, "steps": result.steps, "recovered": result.stopped_early,
        "wall_seconds": result.wall_seconds, "eval_seconds": time.time() - t0, "params": count_params(model),
    }, model=model, tokenizer=tok, state_dict=result.full_state_dict)
    return art
