"""The ``streampress`` command: a thin layer over the Python API.

Sub-commands:

- ``streampress list``: pruning methods with their parameters and defaults, the cacher's
  parameters, supported model families and built-in random architectures (imports no torch).
- ``streampress run VIDEO --model M --ask "12.5: question" ...``: streams a video in real-time
  order through a :class:`~streampress.session.StreamingSession` and answers each question
  when the stream reaches its time.
- ``streampress bench [VIDEO]``: dense baseline and each method on the same frames in one
  process; a table, ``bench.json``, ``bench.md`` and ``bench.png``.
- ``streampress eval ...``: benchmark accuracy (see ``streampress eval --help``).

Errors are reported as one line, ``streampress: error: ...``, with a non-zero exit status;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any, NamedTuple

PROG = "streampress"
# Parameters of streampress.create_cacher (kept here so that `list` needs no torch).
CACHER_PARAMS = {
    "rho": (0.25, "share of tokens recomputed per encoder block in a dependent item"),
    "interval": (2, "every N-th item is encoded in full and becomes the reference"),
    "refresh_threshold": (None, "scene cut: an item whose key similarity to the reference falls "
                                "below this is encoded in full (None: off)"),
}


class Question(NamedTuple):
    """A question of ``streampress run``: asked when the stream reaches ``time`` seconds."""

    time: float
    text: str
    options: list[str] | None = None


# ---------------------------------------------------------------------------- argument types
_TIME_QUESTION = re.compile(r"^\s*(?P<time>(?:\d+:){0,2}\d+(?:\.\d*)?|end)\s*:\s*(?P<text>\S.*)$", re.S)


def parse_question(text: str) -> Question:
    """``"12.5: What is on the table?"`` (also ``"1:05: ..."``, ``"end: ..."``) -> Question."""
    match = _TIME_QUESTION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected 'SECONDS: question' (e.g. '12.5: What is on the table?'), got {text!r}")
    stamp = match["time"]
    seconds = math.inf if stamp == "end" else 0.0
    if stamp != "end":
        for part in stamp.split(":"):
            seconds = seconds * 60 + float(part)
    return Question(seconds, match["text"].strip())


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it is JSON (numbers, true/false, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_size(text: str) -> int | tuple[int, int]:
    """``"448"`` (longer side) or ``"448x336"`` (width x height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
        raise argparse.ArgumentTypeError(f"expected SIDE or WIDTHxHEIGHT (e.g. 448 or 448x336), got {text!r}")
    return (int(match[1]), int(match[2])) if match[2] else int(match[1])


def parse_memory(text: str):
    """``full`` or ``window:SECONDS`` -> the session's ``memory`` argument (``"full"`` or a policy)."""
    if text == "full":
        return "full"
    kind, _, value = text.partition(":")
    if kind == "window":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if seconds > 0 and math.isfinite(seconds):
            from streampress import SlidingWindow

            return SlidingWindow(seconds=seconds)
    raise ValueError(f"--memory: expected 'full' or 'window:SECONDS' (e.g. window:30), got {text!r}")


def _positive(kind):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return convert


class _AskAction(argparse.Action):
    """``--ask`` appends a Question; ``--options`` attaches choices to the last one."""

    def __call__(self, parser, namespace, values, option_string=None):
        questions = list(getattr(namespace, "questions", None) or [])
        if option_string == "--options":
            if not questions:
                parser.error("--options must follow the --ask it belongs to")
            options = [o.strip() for o in values.split(";") if o.strip()]
            if len(options) < 2:
                parser.error(f"--options: expected at least two choices separated by ';', got {values!r}")
            questions[-1] = questions[-1]._replace(options=options)
        else:
            questions.append(values)
        namespace.questions = questions


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    # Accepted before or after the sub-command; SUPPRESS keeps a sub-parser's default from
    # overwriting a flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    parser = argparse.ArgumentParser(prog=PROG, parents=[common],
                                     description="Fast streaming video LLMs: token pruning, vision-encoder "
                                                 "reuse and a streaming runtime.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="methods, parameters and supported models")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_list)

    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    g.add_argument("--num-layers", type=_positive(int), default=None,
                   help="random: architectures only: keep this many LLM layers")
    g.add_argument("--vision-depth", type=_positive(int), default=None,
                   help="random: architectures only: keep this many vision blocks")
    cacher = argparse.ArgumentParser(add_help=False)
    g = cacher.add_argument_group("vision-encoder reuse (STC-Cacher)")
    g.add_argument("--rho", "--cacher-rho", dest="rho", type=_positive(float), default=CACHER_PARAMS["rho"][0],
                   help="fraction of tokens recomputed per block (default 0.25)")
    g.add_argument("--interval", "--cacher-interval", dest="interval", type=_positive(int),
                   default=CACHER_PARAMS["interval"][0], help="full encoder pass every N items (default 2)")
    g.add_argument("--refresh-threshold", type=float, default=None, help="scene-cut threshold (default off)")

    p = sub.add_parser("run", parents=[common, model, cacher], help="answer timed questions on a video",
                       description="Stream a video in real-time order and answer each question at its time.",
                       epilog='example: streampress run clip.mp4 --model random:qwen2.5-vl-tiny '
                              '--method streaming_assistant --ask "2: What moves?" --ask "9.5: What color is it?"')
    p.add_argument("video", help="video file, folder of images, stream URL, /dev/videoN or camera index")
    p.add_argument("--model", required=True, help="hub id, checkpoint folder or random:ARCH (streampress list)")
    p.add_argument("--method", default=None, help="pruning method (streampress list); default: none (dense)")
    p.add_argument("--keep-ratio", type=_positive(float), default=None, help="matched budget in (0, 1]")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="native method parameter, e.g. --param tau=0.8 (repeatable)")
    p.add_argument("--cacher", action="store_true", help="reuse vision-encoder work across similar frames")
    p.add_argument("--fps", type=_positive(float), default=1.0, help="frames per second fed to the model (default 1)")
    p.add_argument("--size", type=parse_size, default=None, help="resize frames when decoding: SIDE or WxH")
    p.add_argument("--max-frames", type=_positive(int), default=None, help="stop after N frames")
    p.add_argument("--ask", dest="questions", action=_AskAction, type=parse_question, metavar="'T: QUESTION'",
                   help="a question asked when the stream reaches T seconds (repeatable; T may be 'end')")
    p.add_argument("--options", action=_AskAction, dest="questions", metavar="'A;B;C'",
                   help="multiple-choice options of the preceding --ask")
    p.add_argument("--max-new-tokens", type=_positive(int), default=32)
    p.add_argument("--memory", default="full", help="full (default) or window:SECONDS")
    p.add_argument("--chunk-frames", type=_positive(int), default=None,
                   help="frames per add_frames call (default: one model item, e.g. 2 for Qwen)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_run, questions=[])

    p = sub.add_parser("bench", parents=[common, model, cacher], help="speed/memory report: dense vs methods",
                       description="Run the dense baseline and each method on the same frames in one process. "
                                   "With no arguments: a reduced-size Qwen2.5-VL with random weights on a "
                                   "synthetic video (no downloads).")
    p.add_argument("video", nargs="?", default=None, help="video file or folder (default: synthetic video)")
    p.add_argument("--model", default=None, help="default: the built-in reduced Qwen2.5-VL-3B architecture")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: a representative set)")
    p.add_argument("--keep-ratio", type=_positive(float), default=0.25, help="budget for every method (default 0.25)")
    p.add_argument("--cacher", action=argparse.BooleanOptionalAction, default=None,
                   help="also run dense + STC-Cacher (default: when the cacher is available)")
    p.add_argument("--frames", type=_positive(int), default=None, help="frames to stream (default 16)")
    p.add_argument("--fps", type=_positive(float), default=1.0, help="frames per second (default 1)")
    p.add_argument("--size", type=parse_size, default=None, help="frame size SIDE or WxH (default 448x448)")
    p.add_argument("--repeats", type=_positive(int), default=1,
                   help="interleaved rounds over all runs; times are medians (default 1)")
    p.add_argument("--question", default="What is moving in the video?", help="asked once, at the end")
    p.add_argument("--out", default="streampress-bench", help="output folder (default ./streampress-bench/)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON on stdout")
    p.set_defaults(func=cmd_bench)

    sub.add_parser("eval", add_help=False, help="benchmark accuracy (OVO-Bench, StreamingBench, ...)")
    return parser


def _version() -> str:
    from streampress import __version__

    return __version__


# ---------------------------------------------------------------------------- commands
def cmd_list(args) -> int:
    from streampress.models import list_families
    from streampress.pruners.registry import describe_methods

    methods = describe_methods()
    families = list_families()
    cacher = {name: default for name, (default, _) in CACHER_PARAMS.items()}
    if args.json:
        print(json.dumps({"methods": methods, "cacher": cacher, "families": families}, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Pruning methods (--method NAME, then --keep-ratio R or --param KEY=VALUE)")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("parameters (defaults), what it does, paper")
    for m in methods:
        params = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in m["params"].items())
        table.add_row(m["name"], f"[cyan]{params or '-'}[/cyan]\n{m.get('summary', '')}\n"
                                 f"[dim]{m.get('paper', '')}[/dim]", end_section=True)
    console.print(table)
    table = Table(title="Vision-encoder reuse: STC-Cacher (--cacher)")
    for column in ("parameter", "default", "meaning"):
        table.add_column(column)
    for name, (default, meaning) in CACHER_PARAMS.items():
        table.add_row(name, str(default), meaning)
    console.print(table)
    table = Table(title="Model families (--model HUB_ID | FOLDER | random:ARCH)")
    for column in ("family", "checkpoint model types", "random architectures"):
        table.add_column(column, overflow="fold")
    for f in families:
        table.add_row(f["name"], "\n".join(f["model_types"]), "\n".join(f"random:{a}" for a in f["random_archs"]))
    console.print(table)
    return 0


def make_pruner(method: str | None, keep_ratio: float | None = None, params: dict | None = None):
    """The pruner for ``--method/--keep-ratio/--param`` (None for dense)."""
    params = dict(params or {})
    if method is None or method.lower() in ("none", "dense"):
        if keep_ratio is not None or params:
            raise ValueError("--keep-ratio and --param need a --method (see streampress list)")
        return None
    from streampress import create_pruner

    if keep_ratio is not None:
        params["keep_ratio"] = keep_ratio
    return create_pruner(method, **params)


def load_model(args, name: str, **defaults):
    """``streampress.load_model`` with the command's device/dtype and random-architecture cuts."""
    from streampress import load_model as load

    kwargs = {k: v for k, v in (("num_layers", args.num_layers), ("vision_depth", args.vision_depth))
              if v is not None}
    if kwargs and not name.startswith("random:"):
        raise ValueError("--num-layers/--vision-depth apply to random: architectures only")
    return load(name, dtype=args.dtype, device=args.device, **{**defaults, **kwargs})


def progress_bar(quiet: bool):
    """A rich progress bar on stderr (stdout stays clean for answers and JSON)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=quiet)


def cmd_run(args) -> int:
    from streampress.cli_run import cmd_run as run

    return run(args)


def cmd_bench(args) -> int:
    from streampress.bench.command import bench_command

    return bench_command(args)


def _run_eval(argv: list[str], debug: bool) -> int:
    try:
        from streampress.eval import cli as eval_cli
    except ImportError as exc:
        raise RuntimeError(f"the eval command is not available in this installation ({exc})") from None
    parser = argparse.ArgumentParser(prog=f"{PROG} eval")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    eval_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return int(eval_cli.run(args) or 0)


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streampress`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if _command_of(argv) == "eval":
            rest = argv[argv.index("eval") + 1:]
            return _run_eval(rest + (["--debug"] if debug and "--debug" not in rest else []), debug)
        parser = build_parser()
        args = parser.parse_args(argv)
        args.quiet = getattr(args, "quiet", False)
        if args.command is None:
            parser.print_help()
            return 2
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


if __name__ == "__main__":
    sys.exit(main())
