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
from ..log import quiet_libraries

COMMAND_MODULES = [
    "undo.cli.experiment",
    "undo.cli.stages",
]


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that takes positionals after options as well as before them:
    `undo attack relearn --model B quick` (the README's order) and `undo attack relearn quick --model B`."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:  # parse_known_intermixed_args calls back here for each of its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="undo",
        description="Robust unlearning for language models: unlearn, noise, distill on outputs, "
                    "and prove it with attacks.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SubcommandParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _discard_stdout() -> None:
    """Send what is left of stdout (and the interpreter's flush at exit) to /dev/null: the
    reader of the pipe has gone, and a BrokenPipeError at exit would print a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout with no file descriptor (captured in tests)
        pass
    finally:
        os.close(devnull)
    sys.stdout = open(os.devnull, "w")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
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
        sys.stdout.flush()  # a reader that left (`undo methods | head -1`) shows here, not at exit
    except UndoError as e:
        print(f"undo: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("undo: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `undo methods | head`: the reader left; nothing to say
        _discard_stdout()
        code = 0
    if distributed.shutdown(ok=code == 0):
        distributed.exit_now(code)
    return code
