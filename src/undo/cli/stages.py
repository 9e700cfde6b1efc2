"""One stage on checkpoints given by path: `undo unlearn` (or a sweep), `undo noise`,
`undo distill`, `undo attack`; and what there is: `undo methods`, `undo attacks`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import to_dict
from ..errors import UndoError
from ..experiment import short
from .common import add_config_args, external_artifact, model_label, parse_sweep, run_dir_for, split_overrides


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods.base import build_method, known_methods

    print(f"{'method':16s} {'needs':34s} defaults")
    for name in known_methods():
        method = build_method(name)
        needs = ", ".join(sorted(method.needs()))
        aux = list(method.aux_models())
        if aux:  # SISA's shards x slices would fill the line: the count and the first and last
            needs += f"; trains {', '.join(aux)}" if len(aux) <= 4 else f"; trains {len(aux)} models {aux[0]}..{aux[-1]}"
        options = ", ".join(f"{k}={short(v)}" for k, v in to_dict(method.options).items() if v not in (None, {}))
        train = ", ".join(f"{k}={short(method.train_defaults[k])}" for k in ("steps", "lr") if k in method.train_defaults)
        per_task = "; ".join(f"{task}: " + ", ".join(f"{k}={short(v)}" for k, v in d.items())
                             for task, d in method.task_defaults.items())
        print(f"{name:16s} {needs:34s} {', '.join(x for x in (options, train) if x)}")
        print(f"{'':16s} {method.description}")
        if per_task:
            print(f"{'':16s} per task: {per_task}")
    print("options: undo unlearn --method NAME --set method.KEY=VALUE; training: --set train.KEY=VALUE")
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from ..attacks import build_attack, known_attacks

    for name in known_attacks():
        attack = build_attack(name)
        print(f"{name:16s} {attack.description}")
        print(f"{'':16s} defaults: " + ", ".join(f"{k}={v}" for k, v in to_dict(attack.options).items()))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from ..tasks import known_tasks, task_class

    for name in known_tasks():
        cls = task_class(name)
        defaults = to_dict(cls.Options())
        print(f"{name:16s} headline: {cls.forget_metric} / {cls.retain_metric} ({cls.metric_label})")
        print(f"{'':16s} options: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0


def _unlearn_table(arts: list, model: str, tolerance: float) -> None:
    from ..stages.select import select_teacher

    first = arts[0].result()
    fm, rm = first["forget_metric"], first["retain_metric"]
    print(f"{'name':32s} {fm:>12s} {rm:>12s}  model")
    f0, r0 = first["metrics_before"][fm], first["metrics_before"][rm]
    print(f"{'(before)':32s} {f0:12.4f} {r0:12.4f}  {model}")
    rows = [a.result() for a in arts]
    for row, art in zip(rows, arts):
        print(f"{row['name']:32s} {row['metrics'][fm]:12.4f} {row['metrics'][rm]:12.4f}  {art.model_dir}")
    if len(rows) > 1:
        try:
            best = select_teacher([{"name": r["name"], "metrics": r["metrics"]} for r in rows], r0, tolerance,
                                  first["higher_is_better"], fm, rm)
            print(f"strongest forgetting within {tolerance:.0%} of the base retain metric: {best}")
        except UndoError as e:
            print(f"no teacher: {e}")


def cmd_unlearn(args: argparse.Namespace) -> int:
    from ..engine import single
    from ..experiment import Recipe, load_experiment
    from ..methods.base import method_class

    method_class(args.method)  # an unknown name fails before anything is loaded
    options, train_over, rest = split_overrides(args.overrides)
    exp = load_experiment(args.config, rest)
    recipe = Recipe(method=args.method, name=args.name, options=options, train=train_over,
                    sweep=parse_sweep(args.sweep))
    recipe.validate("unlearn")
    model = external_artifact(args.model)
    teacher = external_artifact(args.teacher) if args.teacher else None
    run_dir = run_dir_for(args, exp.name)
    arts = [single.unlearn(exp, run_dir, point, model, teacher) for point in recipe.points()]
    _unlearn_table(arts, args.model, exp.unlearn.retain_tolerance)
    return 0


def cmd_noise(args: argparse.Namespace) -> int:
    from ..engine import single

    art = single.noise(external_artifact(args.model), Path(args.out).expanduser(), args.alpha, args.beta, args.seed,
                       force=args.force)
    print(f"noised model: {art.model_dir}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from ..engine import single
    from ..experiment import load_experiment

    exp = load_experiment(args.config, args.overrides)
    student = "model" if args.student_model else ("random" if args.alpha is None else "noised")
    default = {"model": f"distill_{model_label(args.student_model or '.')}", "random": "unlearn_distill"}
    name = args.name or default.get(student) or f"undo_a{args.alpha:g}"
    art = single.distill(exp, run_dir_for(args, exp.name), name, external_artifact(args.teacher), student,
                         args.alpha or 0.0, external_artifact(args.student_model) if args.student_model else None)
    print(f"distilled model: {art.model_dir}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from ..engine import single
    from ..experiment import load_experiment
    from ..attacks import attack_class
    from ..attacks.base import point_label
    from ..store import worst_case
    from ..tasks import build_task

    exp = load_experiment(args.config, args.overrides)
    task = build_task(exp.task, exp.seed)
    name = args.name or model_label(args.model)
    arts = single.attack(exp, run_dir_for(args, exp.name), name, external_artifact(args.model), args.kind)
    points = [{"point": r["point"], "step": p["step"], "metrics": p}
              for r in (a.result() for a in arts) for p in r["curve"]]
    attack = attack_class(args.kind)  # an attack with its own headline (probe: probe_acc) is read by it
    metric = attack.matrix_metric or task.forget_metric
    higher = attack.matrix_higher_is_better if attack.matrix_metric else task.higher_is_better
    print(f"{args.kind}: the attacker's best {metric} over its runs ({name}):")
    for step, value, point in worst_case(points, metric, higher):
        print(f"  step {step:4d}  {value:.4f}  ({point_label(point)})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list unlearning methods, what they need and their defaults")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("attacks", help="list attacks and their defaults")
    p.set_defaults(func=cmd_attacks)

    p = sub.add_parser("tasks", help="list tasks, their headline metrics and options")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("unlearn", help="unlearn the forget domain from a model with one method (or a sweep)")
    p.add_argument("--method", required=True, help="method name (see `undo methods`)")
    p.add_argument("--model", required=True, help="checkpoint to unlearn from (e.g. runs/<name>/seed0/base)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint for methods that need one (oracle_matching: the oracle)")
    p.add_argument("--name", default=None, help="output name (default: the method's name)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="run a grid, e.g. --sweep lr=1e-4,3e-4 (a training setting or method option; repeatable)")
    add_config_args(p)  # --out / --run-dir: models go to OUT/unlearn/<name>
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("noise", help="write a noised copy of a checkpoint (UNDO's noise step)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--alpha", type=float, required=True, help="interpolation weight toward noise, in [0, 1]")
    p.add_argument("--beta", type=float, default=0.1, help="noise scale (paper: 0.1 synthetic, 0 for WMDP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="new directory for the noised checkpoint")
    p.add_argument("--force", action="store_true", help="replace --out even if it exists and holds other files")
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

    p = sub.add_parser("attack", help="attack one checkpoint (see `undo attacks`)")
    p.add_argument("kind", help="the attack (see `undo attacks`; relearn: finetune on forget data, lr sweep)")
    p.add_argument("--model", required=True, help="checkpoint directory to attack")
    p.add_argument("--name", default=None, help="label for the results (default: the checkpoint's stage name)")
    add_config_args(p)
    p.set_defaults(func=cmd_attack)
