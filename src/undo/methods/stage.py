"""The unlearn stage: apply one method to a model, cached and resumable.

    <run_dir>/unlearn/<name>/model        the unlearned checkpoint
    <run_dir>/unlearn/<name>/result.json  method, options, train config, metrics before/after,
                                          FLOPs, wall time, which frozen models were loaded

Also: learning-rate (or any option) sweeps over a run, and `select_teacher`, which picks
the strongest forgetting whose retain metric stays within a tolerance of the base model's
(UNDO's teacher).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import distributed
from ..artifacts import Artifact, ModelDir, source_key
from ..config import config_hash, from_dict, to_dict
from ..data import BatchStream, pad_batch, task_rows
from ..errors import UndoError
from ..models import count_params, load_model
from ..pipeline import say
from ..tasks import Task, build_task
from ..training import TrainConfig, make_accelerator, train
from .base import Method, build_method, method_class
from .config import MethodRun, UnlearnConfig
from .idkdpo import idk_examples

if TYPE_CHECKING:
    from ..experiment import ExperimentConfig


def train_config(method: Method, run: MethodRun) -> TrainConfig:
    """TrainConfig defaults < the method's defaults < the run's overrides."""
    return from_dict(TrainConfig, {**method.train_defaults, **run.train}, f"unlearn {run.name or run.method}: train")


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
    """The data streams `method.needs()` names. The idk stream has the forget stream's rows
    count and seed, so row i of every idk batch answers row i of the forget batch."""
    needs = method.needs()
    forget = task.train_examples("forget")
    streams = {"forget": BatchStream(make_rows(tok, task, forget, method, cfg), cfg.batch_size, seed)}
    if "retain" in needs:
        retain = task.train_examples("retain")
        streams["retain"] = BatchStream(make_rows(tok, task, retain, method, cfg), cfg.batch_size, seed + 1)
    if "idk" in needs:
        if method.row_format != "padded":
            raise UndoError(f"method '{method.name}' pairs idk answers with forget examples; it needs row_format 'padded'")
        idk = make_rows(tok, task, idk_examples(forget, seed), method, cfg)
        streams["idk"] = BatchStream(idk, cfg.batch_size, seed)
    return streams


def headline(task: Task | type[Task], metrics: dict[str, float]) -> tuple[float, float]:
    """(forget, retain) headline metric values."""
    return metrics[task.forget_metric], metrics[task.retain_metric]


def metrics_before(source: Artifact | ModelDir, exp: ExperimentConfig, task: Task, model: PreTrainedModel,
                   tok: PreTrainedTokenizerBase) -> dict[str, float]:
    """The input model's metrics: from its sidecar when it was evaluated on this task and seed, else measured."""
    result = source.result() or {}
    config = result.get("config") or {}
    metrics = result.get("metrics")
    if metrics and config.get("task") == to_dict(exp.task) and result.get("seed") == exp.seed:
        return metrics
    return task.evaluate(model, tok)


def unlearn_stage(exp: ExperimentConfig, run_dir: Path, run: MethodRun, model_art: Artifact | ModelDir,
                  teacher_art: Optional[Artifact | ModelDir] = None, name: Optional[str] = None) -> Artifact:
    """Unlearn with `run` starting from `model_art`'s model; `teacher_art` is used only by
    methods that need a teacher (oracle matching). Returns the artifact (cached by key)."""
    name = name or run.name or run.method
    method = build_method(run.method, run.options, exp.task.name, exp.seed)
    cfg = train_config(method, run)
    needs = method.needs()
    if "teacher" in needs and teacher_art is None:
        raise UndoError(f"method '{run.method}' needs a teacher model (the oracle); pass --teacher PATH")
    if method.step_hook() is not None and cfg.grad_accum != 1:
        raise UndoError(f"method '{run.method}' takes several gradients per step; set train.grad_accum=1")
    teacher_key = source_key(teacher_art) if "teacher" in needs else None
    model_key = source_key(model_art)
    key = config_hash("unlearn", run.method, method.options, cfg, model_key, teacher_key,
                      exp.seed, exp.task)
    art = Artifact(Path(run_dir) / "unlearn", name)
    if art.is_done(key):
        say(f"unlearn {name}: cached ({art.dir})")
        return art

    task = build_task(exp.task, exp.seed)
    model, tok = load_model(model_art.model_dir)
    acc = make_accelerator(cfg)
    model.to(acc.device)  # evaluate before training on the accelerator too
    loaded = []
    reference = teacher = None
    if "reference" in needs:
        reference = load_frozen(model_art.model_dir, acc.device)
        loaded.append("reference")
    if "teacher" in needs:
        teacher = load_frozen(teacher_art.model_dir, acc.device)
        loaded.append("teacher")
    method.attach(reference=reference, teacher=teacher)
    method.prepare(model)
    params = method.trainable_parameters(model)
    chosen = {id(p) for p in params}
    for p in model.parameters():  # frozen parts get no gradients at all (faster, and DDP-safe)
        p.requires_grad_(id(p) in chosen)
    streams = build_streams(task, tok, method, cfg, exp.seed)

    t0 = time.time()
    before = metrics_before(model_art, exp, task, model, tok)
    eval_seconds = time.time() - t0
    say(f"unlearn {name}: {run.method} for {cfg.steps} steps at lr {cfg.lr:g}, training "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M of {count_params(model) / 1e6:.2f}M params"
        + (f"; frozen: {', '.join(loaded)}" if loaded else ""))
    resume = art.resume_dir / key
    if art.resume_dir.exists() and distributed.is_main_process():  # resume points of other configs are stale
        for stale in art.resume_dir.iterdir():
            if stale.name not in (key, key + ".tmp", key + ".old"):
                shutil.rmtree(stale, ignore_errors=True)
    resume.parent.mkdir(parents=True, exist_ok=True)
    evaluate = (lambda m: task.evaluate(m, tok, quick=True)) if cfg.eval_every else None
    try:
        result = train(model, method.loss, streams, cfg, seed=exp.seed, resume_dir=resume, params=params,
                       desc=f"unlearn {name}", accelerator=acc, step_hook=method.step_hook(), evaluate=evaluate,
                       on_start=method.start, on_end=method.finish)
    except UndoError:
        shutil.rmtree(art.resume_dir, ignore_errors=True)  # a diverged run leaves nothing behind
        raise
    model = acc.unwrap_model(model)
    t1 = time.time()
    after = task.evaluate(model, tok)
    eval_seconds += time.time() - t1
    (f0, r0), (f1, r1) = headline(task, before), headline(task, after)
    say(f"unlearn {name}: {task.forget_metric} {f0:.3f} -> {f1:.3f}, {task.retain_metric} {r0:.3f} -> {r1:.3f} "
        f"({result.wall_seconds:.0f}s)")
    art.write(key, {
        "method": run.method, "name": name, "options": to_dict(method.options), "train": to_dict(cfg),
        "seed": exp.seed, "task": to_dict(exp.task), "source": str(model_art.model_dir),
        "source_key": model_key, "teacher": str(teacher_art.model_dir) if teacher is not None else None,
        "needs": sorted(needs), "frozen_models_loaded": loaded,
        "metrics_before": before, "metrics": after,
        "forget_metric": task.forget_metric, "retain_metric": task.retain_metric,
        "higher_is_better": task.higher_is_better,
        "flops": result.flops, "tokens": result.tokens, "steps": result.steps,
        "wall_seconds": result.wall_seconds, "eval_seconds": eval_seconds, "history": result.history,
        "trainable_params": sum(p.numel() for p in params), "final_loss": result.final_loss,
    }, model=model, tokenizer=tok, state_dict=result.full_state_dict)
    return art


# ---------------------------------------------------------------- sweeps and teacher selection

def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_runs(run: MethodRun, sweep: dict[str, list[Any]]) -> list[MethodRun]:
    """The runs of a grid: each key is a TrainConfig field (lr, steps, ...) or an option of
    the run's method; names get a suffix per swept value, e.g. graddiff-lr=0.0003."""
    if not sweep:
        return [run]
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    option_fields = {f.name for f in dataclasses.fields(method_class(run.method).Options)}
    for key in sweep:
        if key not in train_fields and key not in option_fields:
            raise UndoError(f"sweep key '{key}' is neither a training setting ({', '.join(sorted(train_fields))}) "
                            f"nor an option of {run.method} ({', '.join(sorted(option_fields)) or 'none'})")
    runs = []
    for values in itertools.product(*sweep.values()):
        train_over, options = dict(run.train), dict(run.options)
        for key, value in zip(sweep, values):
            (train_over if key in train_fields else options)[key] = value
        suffix = "-".join(f"{k}={_short(v)}" for k, v in zip(sweep, values))
        runs.append(dataclasses.replace(run, name=f"{run.name or run.method}-{suffix}", options=options, train=train_over))
    return runs


def summarize(art: Artifact) -> dict[str, Any]:
    """A finished unlearn artifact as {name, dir, method, lr, forget, retain, flops}."""
    r = art.result()
    if r is None:
        raise UndoError(f"{art.dir} has no result.json; run the unlearn stage first")
    return {"name": r["name"], "dir": str(art.dir), "method": r["method"], "lr": r["train"]["lr"],
            "forget": r["metrics"][r["forget_metric"]], "retain": r["metrics"][r["retain_metric"]],
            "flops": r["flops"]}


def select_teacher(results: list[dict[str, Any]], base_retain: float, tolerance: float,
                   higher_is_better: bool, forget_metric: Optional[str] = None,
                   retain_metric: Optional[str] = None) -> str:
    """The name of the result with the strongest forgetting among those whose retain
    metric stays within `tolerance` (relative) of the base model's `base_retain`.

    A result is a dict with "name" and either "forget"/"retain" values (see `summarize`)
    or "metrics" (a task's metric dict, read at `forget_metric`/`retain_metric`; default
    forget_acc/retain_acc when higher is better, else forget_ce/retain_ce). Raises
    UndoError naming the closest miss when none qualifies."""
    if not results:
        raise UndoError("no unlearning results to choose a teacher from; run `undo unlearn` first")
    suffix = "acc" if higher_is_better else "ce"
    forget_key, retain_key = forget_metric or f"forget_{suffix}", retain_metric or f"retain_{suffix}"

    def value(r: dict[str, Any], short: str, key: str) -> float:
        return r[short] if short in r else r["metrics"][key]

    scored = [(r["name"], value(r, "forget", forget_key), value(r, "retain", retain_key)) for r in results]
    if higher_is_better:  # accuracy: retain may fall by a fraction; lower forget accuracy is stronger
        qualifies = [s for s in scored if s[2] >= base_retain * (1 - tolerance)]
        strength = lambda s: (-s[1], s[2])
    else:                 # cross-entropy: retain may rise by a fraction; higher forget CE is stronger
        qualifies = [s for s in scored if s[2] <= base_retain * (1 + tolerance)]
        strength = lambda s: (s[1], -s[2])
    if not qualifies:
        closest = (max if higher_is_better else min)(scored, key=lambda s: s[2])
        raise UndoError(f"no unlearned model keeps its retain metric within {tolerance * 100:g}% of the base model's "
                        f"({base_retain:.4g}); the closest is {closest[0]} at {closest[2]:.4g}. "
                        f"Sweep smaller learning rates or fewer steps, or raise unlearn.retain_tolerance")
    return max(qualifies, key=strength)[0]  # ties: the better retain metric wins


def unlearn_all(exp: ExperimentConfig, run_dir: Path, model_art: Artifact | ModelDir,
                teacher_art: Optional[Artifact | ModelDir] = None) -> list[Artifact]:
    """Every run of `exp.unlearn` (each expanded by its sweep) from one model."""
    cfg: UnlearnConfig = exp.unlearn
    arts = []
    for run in cfg.methods:
        for one in sweep_runs(run, cfg.sweep):
            arts.append(unlearn_stage(exp, run_dir, one, model_art, teacher_art))
    return arts
