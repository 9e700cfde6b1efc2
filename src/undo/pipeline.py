"""Stages: plain functions from (config, input artifacts) to an output artifact.

Every stage is cached by a hash of its config and inputs (a second run skips what is
done) and resumable (an interrupted stage continues from its last resume point).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from transformers import PreTrainedTokenizerBase

from . import distributed
from .artifacts import Artifact
from .config import config_hash, to_dict
from .errors import UndoError
from .corpora import check_encodes, check_seq_len
from .data import BatchStream, task_rows
from .experiment import ExperimentConfig
from .models import build_model, count_params, load_model
from .tasks import Task, build_task
from .tokenization import load_tokenizer, train_tokenizer
from .training import lm_loss, train


def say(message: str) -> None:
    if distributed.is_main_process():
        print(f"[undo] {message}", flush=True)


def make_tokenizer(exp: ExperimentConfig, task: Task) -> PreTrainedTokenizerBase:
    """The experiment's tokenizer: a given directory, the model's own, or one trained on the task."""
    if exp.tokenizer.path:
        return load_tokenizer(exp.tokenizer.path)
    if exp.model.path:
        return load_tokenizer(exp.model.path)
    return train_tokenizer(task.tokenizer_corpus(), exp.tokenizer.kind, exp.tokenizer.vocab_size,
                           split_digits=exp.tokenizer.split_digits)


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
    check_seq_len(model, exp.pretrain.seq_len, "pretrain.seq_len")
    examples = task.train_examples("retain")
    check_encodes(tok, [ex.prompt + ex.completion for ex in examples[:200]], "training text")
    if which == "base":
        examples = examples + task.train_examples("forget")
        random.Random(exp.seed).shuffle(examples)
    rows = task_rows(tok, task, examples, exp.pretrain.seq_len)
    stream = BatchStream(rows, exp.pretrain.batch_size, seed=exp.seed, bucket=task.row_format() == "padded")
    say(f"{which}: pretraining {count_params(model) / 1e6:.2f}M params for {exp.pretrain.steps} steps "
        f"on {len(examples)} examples ({rows['input_ids'].shape[0]} rows of {task.row_format()} data)")
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
    }, model=model, tokenizer=tok, state_dict=result.full_state_dict)
    return art


def format_scores(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.endswith("/acc")] or [k for k in metrics if k.startswith(("forget_", "retain_"))]
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)


def eval_stage(model_path: str, exp: ExperimentConfig) -> dict[str, Any]:
    task = build_task(exp.task, exp.seed)
    model, tok = load_model(model_path)
    return task.evaluate(model, tok)


# ---------------------------------------------------------------------------------------
# The whole experiment: `undo run`.

def _sidecar(art: Artifact) -> dict[str, Any]:
    result = art.result()
    assert result is not None, f"stage {art.stage} has no result"
    return result


class StageClock:
    """Seconds per stage, and whether the stage came from the cache."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, bool]] = []

    def table(self) -> str:
        lines = [f"{'stage':32s} {'seconds':>8s}"]
        lines += [f"{stage:32s} {seconds:8.1f}{'  (cached)' if cached else ''}" for stage, seconds, cached in self.rows]
        lines.append(f"{'total':32s} {sum(s for _, s, _ in self.rows):8.1f}")
        return "\n".join(lines)


def run_experiment(exp: ExperimentConfig, run_dir: Path) -> Path:
    """Base, oracle, each unlearning method, oracle matching, unlearn-and-distill, UNDO at
    each alpha, the relearning attack on every model, results store and report."""
    from .attacks.relearn import relearn_attack
    from .methods.stage import select_teacher, unlearn_stage
    from .report import summary_text, write_report
    from .store import ResultStore
    from .undo import distill_stage

    distributed.init()
    main = distributed.is_main_process()  # several processes: all train, the main one records
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
    clock = StageClock()
    task = build_task(exp.task, exp.seed)
    store = ResultStore(run_dir / "results.sqlite") if main else _Discard()

    def timed(stage: str, fn, *args, **kwargs):
        t0 = time.time()
        out = fn(*args, **kwargs)
        seconds = time.time() - t0
        cached = seconds < 1.0 and out.result() is not None
        clock.rows.append((stage, seconds, cached))
        store.record_stage_time(stage, seconds, cached)
        return out

    base = timed("pretrain base", pretrain_stage, exp, run_dir, "base")
    oracle = timed("pretrain oracle", pretrain_stage, exp, run_dir, "oracle")
    base_info, oracle_info = _sidecar(base), _sidecar(oracle)
    store.record_model("base", "base", base_info["metrics"], base_info["flops"], base_info["wall_seconds"],
                       {"flops_total": base_info["flops"]})
    store.record_model("oracle", "oracle", oracle_info["metrics"], oracle_info["flops"], oracle_info["wall_seconds"],
                       {"flops_total": oracle_info["flops"]})
    models: dict[str, Artifact] = {"base": base, "oracle": oracle}

    method_results = []
    for run in exp.unlearn.methods:
        name = run.name or run.method
        teacher = oracle if run.method == "oracle_matching" else None
        art = timed(f"unlearn {name}", unlearn_stage, exp, run_dir, run, base, teacher_art=teacher, name=name)
        info = _sidecar(art)
        kind = "oracle_matching" if run.method == "oracle_matching" else "method"
        store.record_model(name, kind, info["metrics"], info["flops"], info["wall_seconds"],
                           {"method": run.method, "flops_total": base_info["flops"] + info["flops"]})
        models[name] = art
        if kind == "method":
            method_results.append({"name": name, "metrics": info["metrics"], "artifact": art})

    teacher_name = _choose_teacher(exp, task, base_info, method_results, select_teacher)
    if teacher_name is not None:
        teacher = models[teacher_name]
        teacher_flops = base_info["flops"] + _sidecar(teacher)["flops"]
        say(f"UNDO teacher: {teacher_name}")
        students = []
        if exp.undo.unlearn_and_distill:
            students.append(("unlearn_distill", "random", 0.0, exp.undo.unlearn_and_distill_steps, "unlearn_distill"))
        students += [(f"undo_a{alpha:g}", "noised", alpha, None, "undo") for alpha in exp.undo.alphas]
        for name, student, alpha, steps, kind in students:
            art = timed(f"distill {name}", distill_stage, exp, run_dir, name, teacher, student, exp.undo,
                        alpha=alpha, steps=steps, say=say)
            info = _sidecar(art)
            store.record_model(name, kind, info["metrics"], info["flops"], info["wall_seconds"],
                               {"alpha": alpha, "teacher": teacher_name, "steps": info["steps"],
                                "recovered": info["recovered"], "flops_total": teacher_flops + info["flops"]})
            models[name] = art

    for name, art in models.items():
        t0 = time.time()
        curves = relearn_attack(exp, run_dir, name, art, exp.attack, say=say)
        for lr, curve in curves.items():
            for point in curve:
                store.record_attack(name, lr, point["step"], {k: v for k, v in point.items() if k != "step"})
        seconds = time.time() - t0
        clock.rows.append((f"attack {name}", seconds, seconds < 1.0))
        store.record_stage_time(f"attack {name}", seconds, seconds < 1.0)

    task_info = {"name": task.name, "forget_metric": task.forget_metric, "retain_metric": task.retain_metric,
                 "higher_is_better": task.higher_is_better, "metric_label": task.metric_label,
                 "oracle_pretrain_flops": oracle_info["flops"]}
    report = run_dir / "report" / "index.html"
    if main:
        (run_dir / "task.json").write_text(json.dumps(task_info))
        report = write_report(run_dir, store, task_info)
        print(summary_text(store, task_info))
        print(clock.table())
        print(f"report: {report}")
    distributed.barrier()
    return report


class _Discard:
    """The results store of a non-main process: records nothing (the main process records)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _choose_teacher(exp, task, base_info, method_results, select_teacher) -> Optional[str]:
    if not method_results:
        say("no unlearning method in the config: skipping UNDO")
        return None
    if exp.undo.teacher != "auto":
        names = [r["name"] for r in method_results]
        if exp.undo.teacher not in names:
            raise UndoError(f"undo.teacher '{exp.undo.teacher}' is not a method run of this experiment; "
                            f"choose one of {', '.join(names)} or 'auto'")
        return exp.undo.teacher
    return select_teacher(method_results, base_info["metrics"][task.retain_metric], exp.unlearn.retain_tolerance,
                          task.higher_is_better)
