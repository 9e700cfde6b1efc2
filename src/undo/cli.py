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


def register(sub: argparse._SubParsersAction) -> None:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except UndoError as e:
        print(f"undo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("undo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
