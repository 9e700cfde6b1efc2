"""`undo methods` (what is there) and `undo unlearn` (run one method, or a sweep of it)."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import apply_overrides, parse_override, to_dict
from ..errors import UndoError


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def cmd_methods(args: argparse.Namespace) -> int:
    from .base import build_method, known_methods

    print(f"{'method':16s} {'needs':34s} defaults")
    for name in known_methods():
        method = build_method(name)
        needs = ", ".join(n for n in ("forget", "retain", "idk", "reference", "teacher") if n in method.needs())
        options = ", ".join(f"{k}={_short(v)}" for k, v in to_dict(method.options).items() if v not in (None, {}))
        train = ", ".join(f"{k}={_short(method.train_defaults[k])}" for k in ("steps", "lr") if k in method.train_defaults)
        per_task = "; ".join(f"{task}: " + ", ".join(f"{k}={_short(v)}" for k, v in d.items())
                             for task, d in method.task_defaults.items())
        print(f"{name:16s} {needs:34s} {', '.join(x for x in (options, train) if x)}")
        print(f"{'':16s} {method.description}")
        if per_task:
            print(f"{'':16s} per task: {per_task}")
    print("options: undo unlearn --method NAME --set method.KEY=VALUE; training: --set train.KEY=VALUE")
    return 0


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """`method.X=V` -> method options, `train.X=V` -> TrainConfig overrides, the rest -> experiment config."""
    sections: dict[str, dict[str, Any]] = {"method": {}, "train": {}}
    rest = []
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] in sections and len(path) > 1:
            sections[path[0]] = apply_overrides(sections[path[0]], [text.split(".", 1)[1]])
        else:
            rest.append(text)
    return sections["method"], sections["train"], rest


def parse_sweep(texts: list[str]) -> dict[str, list[Any]]:
    """`--sweep lr=1e-5,3e-5` -> {"lr": [1e-05, 3e-05]}."""
    sweep: dict[str, list[Any]] = {}
    for text in texts:
        if "=" not in text:
            raise UndoError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. --sweep lr=1e-4,3e-4")
        key, raw = text.split("=", 1)
        values = [parse_override(f"x={v.strip()}")[1] for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise UndoError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. --sweep lr=1e-4,3e-4")
        sweep[key.strip()] = values
    return sweep


def cmd_unlearn(args: argparse.Namespace) -> int:
    from ..cli import run_dir_for
    from ..experiment import load_experiment
    from .base import method_class
    from .config import MethodRun
    from ..artifacts import model_source
    from .stage import select_teacher, summarize, sweep_runs, unlearn_stage

    method_class(args.method)  # an unknown name fails before anything is loaded
    options, train_over, rest = split_overrides(args.overrides)
    exp = load_experiment(args.config, rest)
    run = MethodRun(method=args.method, name=args.name, options=options, train=train_over)
    run.validate("unlearn")
    model = model_source(args.model)
    teacher = model_source(args.teacher) if args.teacher else None
    runs = sweep_runs(run, parse_sweep(args.sweep))
    run_dir = run_dir_for(args, exp.name)
    arts = [unlearn_stage(exp, run_dir, one, model, teacher) for one in runs]
    rows = [summarize(a) for a in arts]
    first = arts[0].result()
    print(f"{'name':32s} {first['forget_metric']:>12s} {first['retain_metric']:>12s}  model")
    f0, r0 = first["metrics_before"][first["forget_metric"]], first["metrics_before"][first["retain_metric"]]
    print(f"{'(before)':32s} {f0:12.4f} {r0:12.4f}  {args.model}")
    for row, art in zip(rows, arts):
        print(f"{row['name']:32s} {row['forget']:12.4f} {row['retain']:12.4f}  {art.model_dir}")
    if len(rows) > 1:
        try:
            best = select_teacher(rows, r0, exp.unlearn.retain_tolerance, first["higher_is_better"])
            print(f"strongest forgetting within {exp.unlearn.retain_tolerance:.0%} of the base retain metric: {best}")
        except UndoError as e:
            print(f"no teacher: {e}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_config_args

    p = sub.add_parser("methods", help="list unlearning methods, what they need and their defaults")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("unlearn", help="unlearn the forget domain from a model with one method (or a sweep)")
    p.add_argument("--method", required=True, help="method name (see `undo methods`)")
    p.add_argument("--model", required=True, help="checkpoint to unlearn from (e.g. runs/<name>/base)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint for methods that need one (oracle_matching: the oracle)")
    p.add_argument("--name", default=None, help="output name (default: the method's name)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="run a grid, e.g. --sweep lr=1e-4,3e-4 (a training setting or method option; repeatable)")
    add_config_args(p)
    p.add_argument("--out", dest="run_dir", default=None,
                   help="run directory: models go to OUT/unlearn/<name> (default: runs/<experiment name>)")
    p.set_defaults(func=cmd_unlearn)
