"""Whole experiments: `undo run`, `undo plan`, `undo pretrain`, `undo eval`, `undo report`, `undo presets`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UndoError
from .common import add_config_args, run_dir_for


def seed_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, with `--seeds N` as seeds=[0, ..., N-1] after them (it wins)."""
    if args.seeds is None:
        return list(args.overrides)
    if args.seeds < 1:
        raise UndoError(f"--seeds {args.seeds}: give the number of graph seeds, at least 1 (--seeds 3 = seeds 0, 1, 2)")
    return [*args.overrides, f"seeds=[{', '.join(str(s) for s in range(args.seeds))}]"]


def add_seeds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="replicate the whole graph over seeds 0..N-1 (= --set seeds=[0,...,N-1]); the report "
                        "shows means with spreads")


def cmd_run(args: argparse.Namespace) -> int:
    from ..engine.executors import RayOptions
    from ..engine.run import run_experiment
    from ..experiment import load_experiment

    exp = load_experiment(args.config, seed_overrides(args))
    ray = RayOptions(address=args.address, num_cpus=args.num_cpus, gpus_per_stage=args.gpus_per_stage)
    run_experiment(exp, run_dir_for(args, exp.name), executor="ray" if args.executor == "ray" else "local",
                   ray_options=ray, jobs=jobs_for(args))
    return 0


def jobs_for(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..engine.executors import default_jobs

    if args.executor == "inprocess" or (args.jobs is None and distributed.world_size() > 1):
        return 1
    if args.jobs is not None and args.jobs < 1:
        raise UndoError(f"--jobs must be at least 1, got {args.jobs}")
    return args.jobs if args.jobs is not None else default_jobs()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..engine.graph import build_graph
    from ..engine.plan import plan_json, plan_text
    from ..experiment import load_experiment

    exp = load_experiment(args.config, seed_overrides(args))
    graph = build_graph(exp)
    run_dir = run_dir_for(args, exp.name)
    print(plan_json(graph, run_dir) if args.json else plan_text(graph, run_dir))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..engine.executors import inputs_of
    from ..engine.graph import build_graph
    from ..engine.runner import run_stage
    from ..experiment import load_experiment

    exp = load_experiment(args.config, args.overrides)
    run_dir = run_dir_for(args, exp.name)
    wanted = list(exp.models) if args.which in ("all", "both") else [args.which]
    unknown = [w for w in wanted if w not in exp.models]
    if unknown:
        raise UndoError(f"--which {unknown[0]}: the experiment has no starting model of that name; "
                        f"models: {', '.join(exp.models)}")
    graph = build_graph(exp)
    for node in graph.nodes.values():
        if node.kind in ("pretrain", "checkpoint") and node.name in wanted:
            art = run_stage(node, exp.for_seed(node.seed), run_dir, inputs_of(node, run_dir))
            print(f"{node.id}: {art.model_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..experiment import load_experiment
    from ..stages.evaluate import evaluate_model
    from .common import external_artifact

    if args.harness:
        return cmd_eval_harness(args)
    if args.limit is not None or args.include_path:
        raise UndoError("--limit and --include-path go with --harness; the experiment's task takes "
                        "--set task.options.eval_limit=N where it has one")
    if not args.model:
        raise UndoError("undo eval: give the checkpoint with --model DIR (or lm-eval tasks with --harness TASKS DIR)")
    exp = load_experiment(args.config or "arithmetic", args.overrides)
    metrics = evaluate_model(str(external_artifact(args.model).model_dir), exp)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(len(k) for k in metrics)
        for k, v in metrics.items():
            print(f"{k:{width}s}  {v:.4f}")
    return 0


def harness_args(args: argparse.Namespace) -> tuple[list[str], str]:
    """The lm-eval task names and the checkpoint of `undo eval --harness`, checked."""
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    if not tasks:
        raise UndoError("--harness: give lm-eval task names, comma-separated, e.g. --harness wmdp_bio,mmlu")
    if args.model and args.config:
        raise UndoError("undo eval --harness: give the model once, as DIR or --model DIR (no experiment config)")
    if args.overrides:
        raise UndoError("undo eval --harness: --set applies to the experiment's task, not to lm-eval tasks")
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UndoError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return tasks, args.model or args.config


def cmd_eval_harness(args: argparse.Namespace) -> int:
    """`undo eval --harness TASKS [--limit N] DIR`: lm-evaluation-harness on a checkpoint."""
    from ..harness import import_lm_eval, run_harness
    from .common import external_artifact

    tasks, model = harness_args(args)
    import_lm_eval()
    if not model:
        raise UndoError("undo eval --harness TASKS DIR: give the checkpoint directory (or a run's stage directory)")
    results = run_harness(str(external_artifact(model).model_dir), tasks, args.limit, args.include_path,
                          args.batch_size, args.device)
    if args.json:
        print(json.dumps(results["results"], indent=2, default=str))
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


def read_task_info(run_dir: Path) -> dict:
    """`<run>/task.json`, what the report needs to know of the task; UndoError if it is missing or damaged."""
    db, info = run_dir / "results.sqlite", run_dir / "task.json"
    if not db.exists() or not info.exists():
        raise UndoError(f"{run_dir} has no finished run (results.sqlite and task.json); run `undo run` first")
    fix = "rerun `undo run` with the same config to rewrite it (finished stages are cached)"
    try:
        task = json.loads(info.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UndoError(f"{info} is corrupt (not JSON); {fix}") from None
    missing = [k for k in ("forget_metric", "retain_metric", "higher_is_better")
               if not isinstance(task, dict) or k not in task]
    if missing:
        raise UndoError(f"{info} is corrupt (no {', '.join(missing)}); {fix}")
    return task


def cmd_report(args: argparse.Namespace) -> int:
    from ..engine.run import write_report_safely
    from ..report import summary_text
    from ..store import ResultStore

    run_dir = Path(args.run_dir).expanduser()
    task = read_task_info(run_dir)
    store = ResultStore(run_dir / "results.sqlite")
    path = write_report_safely(run_dir, store, task)
    print(summary_text(store, task))
    print(f"report: {path}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ..experiment import preset_names, preset_summary
    from ..models import PRESETS

    print("experiment presets (undo run NAME):")
    for name in preset_names():
        print(f"  {name:19s} {preset_summary(name)}")
    print("model presets (model.preset):")
    for name, (arch, _, about) in PRESETS.items():
        print(f"  {name:14s} {arch:8s} {about}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a whole experiment: its stage graph (pretrain, unlearn, UNDO, attacks), "
                                   "then the report")
    add_config_args(p)
    add_seeds_arg(p)
    p.add_argument("--executor", choices=["local", "inprocess", "ray"], default="local",
                   help="where stages run: on this machine (default; --jobs side by side), or on Ray "
                        "(pip install -e '.[ray]'); inprocess = local with --jobs 1")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="local: stages side by side in N worker processes (default: the cores, at most 4, on a "
                        "CPU-only machine; 1 with a GPU or under accelerate launch; 1 = in this process, in order)")
    p.add_argument("--address", default=None, help="Ray: a cluster's HOST:PORT (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray: workers of a local Ray (default: all cores)")
    p.add_argument("--gpus-per-stage", type=float, default=0.0, help="Ray: GPUs each training stage requests")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="print the experiment's stage graph: inputs, cache keys, done or not, "
                                    "estimated FLOPs and time")
    add_config_args(p)
    add_seeds_arg(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pretrain", help="the starting models: pretrain base (retain+forget) and oracle (retain only)")
    add_config_args(p)
    p.add_argument("--which", default="all", help="a starting model's name (base, oracle, ...) or all")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate any checkpoint on the experiment's task, or on lm-eval tasks (--harness)",
                       description="undo eval --model DIR [CONFIG]: the experiment's task metrics. "
                                   "undo eval --harness TASKS [--limit N] DIR: lm-evaluation-harness tasks "
                                   "(pip install -e '.[lmeval]'), offline.")
    p.add_argument("--model", default=None, help="checkpoint directory (HF format) or a run's stage directory")
    add_config_args(p)
    p.set_defaults(config=None)  # with --harness the positional is the model
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--harness", metavar="TASKS", default=None,
                   help="run lm-evaluation-harness instead: comma-separated task names (e.g. wmdp_bio,mmlu) "
                        "on the model given as the positional or --model")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="--harness: the first N documents of each task")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="--harness: a directory of extra lm-eval task YAMLs")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="--harness: lm-eval batch size (default 8)")
    p.add_argument("--device", default=None, help="--harness: cuda, cuda:1, cpu, ... (default: cuda if available)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="write the HTML report of a finished run")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("presets", help="list experiment and model presets")
    p.set_defaults(func=cmd_presets)
