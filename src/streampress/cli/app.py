"""The ``streampress`` command: the top-level parser, dispatch to the sub-commands, one-line errors.

Each sub-command is a module of this package (:mod:`.list`, :mod:`.run`, :mod:`.bench`,
:mod:`.eval`, :mod:`.serve`) with ``add_parser(subparsers, common)``, which sets ``func`` (the command) and
optionally ``check(args)`` (checks across options, bound to the sub-parser) as parser
defaults. Argument errors are one line ``streampress CMD: error: ...`` with exit status 2;
any other error is one line ``streampress: error: ...`` with status 1, or its traceback with
``--debug``.
"""

from __future__ import annotations

import argparse
import sys

from . import bench as bench_command
from . import eval as eval_command
from . import list as list_command
from . import run as run_command
from . import serve as serve_command
from .options import PROG, Parser, add_common

__all__ = ["build_parser", "parse_args", "main", "error_line"]

COMMANDS = (list_command, run_command, bench_command, eval_command, serve_command)


def build_parser() -> Parser:
    common = argparse.ArgumentParser(add_help=False)
    add_common(common)
    parser = Parser(prog=PROG, parents=[common],
                    description="Fast streaming video LLMs: token pruning, vision-encoder reuse and a "
                                "streaming runtime.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, common)
    for sub_parser in sub.choices.values():  # errors found after parsing name their sub-command
        sub_parser.set_defaults(error=sub_parser.error)
    return parser


def _version() -> str:
    from streampress import __version__

    return __version__


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check ``argv`` (without the program name) as the command does; argument
    errors exit (SystemExit 2) with their one line on stderr."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "error", parser.error)(f"unrecognized arguments: {' '.join(extra)}")
    args.quiet = getattr(args, "quiet", False)
    args.debug = getattr(args, "debug", False)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    if hasattr(args, "check"):
        args.check(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streampress`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # --help, --version, argument errors
            return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `streampress list | head`
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 1


def error_line(exc: BaseException) -> str:
    """A one-line description of ``exc`` (its message, else its class name)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"missing module {exc.name!r} ({text}); is streampress fully installed?"
    if not text or isinstance(exc, (KeyError, AttributeError, IndexError)):
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text
