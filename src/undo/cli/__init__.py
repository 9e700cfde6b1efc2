"""The `undo` command. Subcommands mirror the engine and the stages.

Every error a user can cause ends as one line on stderr and exit code 2.
Each module of COMMAND_MODULES adds its subcommands through `register(subparsers)`, so
the command line grows without this file knowing each stage.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import UndoError

COMMAND_MODULES = [
    "undo.cli.experiment",
    "undo.cli.stages",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="undo",
        description="Robust unlearning for language models: unlearn, noise, distill on outputs, "
                    "and prove it with attacks.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .. import distributed

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
    except BrokenPipeError:  # `undo methods | head`: the reader left; nothing to say
        sys.stdout = open(os.devnull, "w")
        code = 0
    if distributed.shutdown(ok=code == 0):
        distributed.exit_now(code)
    return code
