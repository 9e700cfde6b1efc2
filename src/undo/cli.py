"""The `undo` command. Subcommands mirror the stages.

Every error a user can cause ends as one line on stderr and exit code 2.
Other modules add subcommands through a `register(subparsers)` function listed in
COMMAND_MODULES, so the command line grows without this file knowing each stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .errors import UndoError

COMMAND_MODULES = [
    "undo.cli",
    "undo.methods.cli",
]


def add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", default="arithmetic",
                   help="experiment YAML file or preset name (default: arithmetic; see `undo presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.steps=200 (repeatable)")
    p.add_argument("--run-dir", default=None, help="where artifacts go (default: runs/<name>)")


def run_dir_for(args: argparse.Namespace, name: str) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / name


def cmd_presets(args: argparse.Namespace) -> int:
    from .experiment import preset_names
    from .models import PRESETS

    print("experiment presets (undo run NAME):")
    for name in preset_names():
        print(f"  {name}")
    print("model presets (model.preset):")
    for name, (arch, _, about) in PRESETS.items():
        print(f"  {name:14s} {arch:8s} {about}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .experiment import load_experiment
    from .pipeline import pretrain_stage

    exp = load_experiment(args.config, args.overrides)
    run_dir = run_dir_for(args, exp.name)
    for which in (["base", "oracle"] if args.which == "both" else [args.which]):
        art = pretrain_stage(exp, run_dir, which)
        print(f"{which}: {art.model_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .experiment import load_experiment
    from .pipeline import eval_stage

    exp = load_experiment(args.config, args.overrides)
    metrics = eval_stage(args.model, exp)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(len(k) for k in metrics)
        for k, v in metrics.items():
            print(f"{k:{width}s}  {v:.4f}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment import load_experiment
    from .pipeline import run_experiment

    exp = load_experiment(args.config, args.overrides)
    run_experiment(exp, run_dir_for(args, exp.name))
    return 0


def cmd_noise(args: argparse.Namespace) -> int:
    from .undo import noise_stage

    out = Path(args.out)
    art = noise_stage(external_artifact(args.model), out.parent, out.name, args.alpha, args.beta, args.seed)
    print(f"noised model: {art.model_dir}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .experiment import load_experiment
    from .undo import distill_stage

    exp = load_experiment(args.config, args.overrides)
    teacher = external_artifact(args.teacher)
    student_art = external_artifact(args.student_model) if args.student_model else None
    student = "model" if student_art else ("random" if args.alpha is None else "noised")
    name = args.name or ("unlearn_distill" if student == "random" else f"undo_a{args.alpha:g}")
    art = distill_stage(exp, run_dir_for(args, exp.name), name, teacher, student, exp.undo,
                        alpha=args.alpha or 0.0, student_art=student_art)
    print(f"distilled model: {art.model_dir}")
    return 0


def model_label(path: str | Path) -> str:
    """A model's name for results: its stage (`runs/x/undo_a0.3` or `runs/x/undo_a0.3/model`
    are both undo_a0.3), else the directory's name."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "model" else path.name


def cmd_attack(args: argparse.Namespace) -> int:
    from .attacks.relearn import relearn_attack
    from .experiment import load_experiment
    from .store import worst_case_curve
    from .tasks import build_task

    exp = load_experiment(args.config, args.overrides)
    task = build_task(exp.task, exp.seed)
    target = external_artifact(args.model)
    name = args.name or model_label(args.model)
    curves = relearn_attack(exp, run_dir_for(args, exp.name), name, target, exp.attack)
    points = [{"lr": lr, "step": p["step"], "metrics": p} for lr, curve in curves.items() for p in curve]
    print(f"worst case over learning rates of {task.forget_metric} ({name}):")
    for step, value, lr in worst_case_curve(points, task.forget_metric, task.higher_is_better):
        print(f"  step {step:4d}  {value:.4f}  (lr {lr:g})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import summary_text, write_report
    from .store import ResultStore

    run_dir = Path(args.run_dir)
    db, info = run_dir / "results.sqlite", run_dir / "task.json"
    if not db.exists() or not info.exists():
        raise UndoError(f"{run_dir} has no finished run (results.sqlite and task.json); run `undo run` first")
    store = ResultStore(db)
    task = json.loads(info.read_text())
    path = write_report(run_dir, store, task)
    print(summary_text(store, task))
    print(f"report: {path}")
    return 0


def external_artifact(model_dir: str):
    """A stage input from the command line: a run's `<stage>/` or `<stage>/model` directory
    (its Artifact, cache key included) or any HF model directory."""
    from .artifacts import model_source

    path = Path(model_dir)
    if not ((path / "config.json").exists() or (path / "model" / "config.json").exists()):
        raise UndoError(f"{path} is not a model directory (no config.json); give a checkpoint such as runs/<name>/base/model")
    return model_source(path)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a whole experiment: pretrain, unlearn, UNDO, attack, report")
    add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("noise", help="write a noised copy of a checkpoint (UNDO's noise step)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--alpha", type=float, required=True, help="interpolation weight toward noise, in [0, 1]")
    p.add_argument("--beta", type=float, default=0.1, help="noise scale (paper: 0.1 synthetic, 0 for WMDP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="new directory for the noised checkpoint")
    p.set_defaults(func=cmd_noise)

    p = sub.add_parser("distill", help="distill a teacher's outputs into a noised copy (UNDO), a random "
                                       "student, or a given model")
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    p.add_argument("--alpha", type=float, default=None, help="UNDO: noise the teacher with this alpha "
                                                              "(omit for a randomly initialised student)")
    p.add_argument("--student-model", default=None, help="distill into this checkpoint instead")
    p.add_argument("--name", default=None, help="artifact name inside the run directory")
    add_config_args(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("attack", help="attacks on a model (relearn: finetune on forget data, lr sweep)")
    p.add_argument("kind", choices=["relearn"], help="the attack")
    p.add_argument("--model", required=True, help="checkpoint directory to attack")
    p.add_argument("--name", default=None, help="label for the results (default: the checkpoint's stage name)")
    add_config_args(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("report", help="write the HTML report of a finished run")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("presets", help="list experiment and model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("pretrain", help="pretrain the base (retain+forget) and oracle (retain only) models")
    add_config_args(p)
    p.add_argument("--which", choices=["base", "oracle", "both"], default="both")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate any checkpoint on the experiment's task")
    p.add_argument("--model", required=True, help="checkpoint directory (HF format)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="undo",
        description="Robust unlearning for language models: unlearn, noise, distill on outputs, "
                    "and prove it with relearning attacks.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    hf_logging.set_verbosity_error()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from . import distributed

    code = 1
    try:
        distributed.init()  # under accelerate launch / torchrun: join the group before any stage
        if not distributed.is_main_process():  # one copy of every table and path, from the main process
            sys.stdout = open(os.devnull, "w")
        code = args.func(args) or 0
    except UndoError as e:
        print(f"undo: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("undo: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    if distributed.shutdown(ok=code == 0):
        distributed.exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
