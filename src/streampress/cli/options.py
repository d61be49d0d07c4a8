"""What ``run``, ``bench`` and ``eval`` share: the parser class, argument types and option groups.

Every sub-command builds its parser from the groups below, so an option is spelled, checked
and documented the same way wherever it appears:

- ``--model``, ``--device``, ``--dtype`` (:func:`add_model_options`);
- ``--method`` (``none``, also spelled ``dense``: no pruning), ``--keep-ratio``, ``--param
  KEY=VALUE`` (:func:`add_method_options`);
- ``--cacher``, ``--cacher-rho``, ``--cacher-interval``, ``--cacher-refresh-threshold``;
- ``--memory full | window:SECONDS | retrieval:window=SECONDS,top_k=K[,block_items=N]``;
- ``--fps``, ``--size W|WxH``, ``--max-new-tokens``.

Types check a value as it is read: a bad one stops the command with one line,
``streampress run: error: argument --keep-ratio: expected a number in (0, 1], got '5'; see
'streampress run --help'`` and exit status 2 (:class:`Parser`). Old spellings (``--rho``,
``--interval``, ``--window``, ``--methods``) are refused the same way, naming the new one.
:func:`check` then does the checks that involve several options (building the pruner once
checks its parameters) and leaves ``params`` (a dict) and ``cacher`` (the cacher's parameters,
or None) on the namespace; ``memory`` is a spec dict (None: the full cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any, NamedTuple

from .. import spec
from .model import model_name

PROG = "streampress"
# Parameters of streampress.create_cacher (here so that `list` and --help need no torch).
CACHER_PARAMS = {
    "rho": (0.25, "share of tokens recomputed per encoder block in a dependent item"),
    "interval": (2, "every N-th item is encoded in full and becomes the reference"),
    "refresh_threshold": (None, "scene cut: an item whose key similarity to the reference falls "
                                "below this is encoded in full (None: off)"),
}
NO_PRUNING = "none"  # the --method word for no pruning; "dense" is read as the same word
DTYPES = ("float32", "bfloat16", "float16")
MEMORY_FORMS = spec.MEMORY_FORMS


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE; see 'PROG --help'``, status 2.

    Abbreviated options are off: ``--keep`` is no spelling of ``--keep-ratio``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see '{self.prog} --help'\n")


def fail(text: str):
    """Raise the error argparse reports as ``argument --opt: TEXT``."""
    raise argparse.ArgumentTypeError(text)


# ---------------------------------------------------------------------------- numbers
def _number(text: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def positive_int(text: str) -> int:
    value = _number(text, int)
    return value if value is not None and value >= 1 else fail(f"expected an integer >= 1, got {text!r}")


def count(text: str) -> int:
    value = _number(text, int)
    return value if value is not None and value >= 0 else fail(f"expected an integer >= 0, got {text!r}")


def integer(text: str) -> int:
    value = _number(text, int)
    return value if value is not None else fail(f"expected an integer, got {text!r}")


def positive_float(text: str) -> float:
    value = _number(text)
    return value if value is not None and value > 0 else fail(f"expected a finite number > 0, got {text!r}")


def non_negative_float(text: str) -> float:
    value = _number(text)
    return value if value is not None and value >= 0 else fail(f"expected a finite number >= 0, got {text!r}")


def fraction(text: str) -> float:
    """A share in (0, 1]: ``--keep-ratio``, ``--cacher-rho``."""
    value = _number(text)
    return value if value is not None and 0 < value <= 1 else fail(f"expected a number in (0, 1], got {text!r}")


def similarity(text: str) -> float:
    value = _number(text)
    return value if value is not None and -1 <= value <= 1 else fail(f"expected a number in [-1, 1], got {text!r}")


# ---------------------------------------------------------------------------- other values
def method(text: str) -> str:
    """A registered pruning method (its canonical name), or ``none`` (also ``dense``)."""
    name = text.strip()
    if name.lower() in (NO_PRUNING, "dense"):
        return NO_PRUNING
    if name.lower() == "full":
        fail("'full' is no method; no pruning is spelled 'none'")
    from streampress.pruners.registry import resolve_name  # no torch

    try:
        return resolve_name(name).name
    except ValueError as exc:
        fail(str(exc))


def method_list(text: str) -> tuple[str, ...]:
    """``a,b,c``: several methods (``none`` alone: no pruned run)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        fail(f"expected method names separated by commas, got {text!r}")
    names = [method(p) for p in parts]
    return tuple(dict.fromkeys(n for n in names if n != NO_PRUNING))


def nonblank(value: str) -> str:
    """Any text that is not blank."""
    return value if value.strip() else fail(f"expected some text, got {value!r}")


def param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it is JSON (numbers, true/false, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        fail(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def size(text: str) -> int | tuple[int, int]:
    """``448`` (the longer side, aspect kept) or ``448x336`` (width x height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
        fail(f"expected W (the longer side) or WxH, e.g. 448 or 448x336, got {text!r}")
    return (int(match[1]), int(match[2])) if match[2] else int(match[1])


def size_text(value) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, (tuple, list)) else str(value)


def aspect_note(size_value, width: int | None, height: int | None) -> str | None:
    """The note to print when ``--size WxH`` changes a ``width x height`` video's aspect ratio."""
    if not isinstance(size_value, tuple) or not width or not height:
        return None
    if abs(size_value[0] * height - size_value[1] * width) <= 0.01 * width * size_value[1]:
        return None
    return (f"--size {size_text(size_value)} changes the aspect ratio of the {width}x{height} video; "
            "give one number (the longer side) to keep it")


def dtype(text: str) -> str:
    name = text.strip().lower().removeprefix("torch.")
    return name if name in DTYPES else fail(f"expected {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {text!r}")


def device(text: str) -> str:
    if re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", text.strip()):
        return text.strip()
    fail(f"expected cpu, cuda or cuda:N (also mps, xpu), got {text!r}")


def memory(text: str) -> dict | None:
    """``--memory``: a spec dict (None for ``full``; see :mod:`streampress.spec`)."""
    try:
        return spec.parse_memory(text)
    except ValueError as exc:
        fail(str(exc))


memory_text = spec.memory_text
memory_policy = spec.memory_policy


class Synthetic(NamedTuple):
    """The built-in synthetic clip as a video argument: ``synthetic`` or ``synthetic:SECONDS``."""

    seconds: float = 8.0


def video(text: str):
    """The VIDEO argument: an existing file or folder as it is; else ``synthetic[:SECONDS]``,
    a camera index (``0`` -> camera 0), or the text (a stream URL, a device name)."""
    if os.path.exists(text):
        return text
    if text.isdigit():
        return int(text)
    kind, colon, rest = text.partition(":")
    if kind == "synthetic":
        if not colon or not rest:
            return Synthetic()
        seconds = _number(rest)
        return Synthetic(seconds) if seconds and seconds > 0 else fail(
            f"expected synthetic or synthetic:SECONDS with seconds > 0, got {text!r}")
    return text


# ---------------------------------------------------------------------------- old spellings
class Renamed(argparse.Action):
    """An old spelling, hidden from ``--help``: refused with one line naming the new one."""

    def __init__(self, option_strings, dest, new: str, **_):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is spelled {self.new} now")


# ---------------------------------------------------------------------------- option groups
def add_common(parser: argparse.ArgumentParser) -> None:
    """``--debug`` and ``-q``: accepted before and after the sub-command (SUPPRESS keeps a
    sub-parser's default from overwriting a flag given before it)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress output on stderr")


def add_model_options(parser, *, default: str | None = None, required: bool = False,
                      model_help: str = "", cuts: bool = False) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=model_name, default=default, required=required, metavar="NAME",
                   help=model_help or "checkpoint folder, hub id OWNER/NAME or random:ARCH (streampress list)")
    g.add_argument("--device", type=device, default=None,
                   help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", type=dtype, default=None,
                   help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    if cuts:
        g.add_argument("--num-layers", type=positive_int, default=None, metavar="N",
                       help="random: architectures only: keep this many LLM layers")
        g.add_argument("--vision-depth", type=positive_int, default=None, metavar="N",
                       help="random: architectures only: keep this many vision blocks")


def add_method_options(parser, *, several: bool = False, default=NO_PRUNING, keep_ratio_help: str = "") -> None:
    g = parser.add_argument_group("token pruning (streampress list)")
    if several:
        g.add_argument("--method", type=method_list, default=default, metavar="M1,M2,...",
                       help=f"methods run after the dense baseline, separated by commas (default "
                            f"{','.join(default)}); none: the baseline only")
        g.add_argument("--methods", action=Renamed, new="--method A,B,C")
    else:
        g.add_argument("--method", type=method, default=default, metavar="NAME",
                       help="pruning method, or none (also spelled dense): no pruning (default none)")
    g.add_argument("--keep-ratio", type=fraction, default=None, metavar="R",
                   help=keep_ratio_help or "matched budget in (0, 1]: the share of visual tokens kept "
                                           "(default: the method's own rule)")
    g.add_argument("--param", action="append", type=param, default=[], metavar="KEY=VALUE",
                   help="a method's own parameter, e.g. --param tau=0.8 (repeatable)")


def add_cacher_options(parser, *, optional: bool = False) -> None:
    g = parser.add_argument_group("vision-encoder reuse (STC-Cacher)")
    if optional:
        g.add_argument("--cacher", action=argparse.BooleanOptionalAction, default=None,
                       help="also run dense + STC-Cacher (default: when the cacher is installed)")
    else:
        g.add_argument("--cacher", action="store_true", help="reuse vision-encoder work across similar frames")
    rho, interval = CACHER_PARAMS["rho"][0], CACHER_PARAMS["interval"][0]
    g.add_argument("--cacher-rho", type=fraction, default=None, metavar="RHO",
                   help=f"share of tokens recomputed per encoder block, in (0, 1] (default {rho})")
    g.add_argument("--cacher-interval", type=positive_int, default=None, metavar="N",
                   help=f"a full encoder pass every N items (default {interval})")
    g.add_argument("--cacher-refresh-threshold", type=similarity, default=None, metavar="SIM",
                   help="scene cut: a full pass when the key similarity to the reference falls below SIM "
                        "(default off)")
    for old, new in (("--rho", "--cacher-rho RHO"), ("--interval", "--cacher-interval N"),
                     ("--refresh-threshold", "--cacher-refresh-threshold SIM")):
        g.add_argument(old, action=Renamed, new=new)


def add_memory_option(parser) -> None:
    parser.add_argument("--memory", type=memory, default=None, metavar="SPEC",
                        help="KV-cache memory: full (default); window:SECONDS (keep the last SECONDS of "
                             "video); retrieval:window=SECONDS,top_k=K[,block_items=N] (older video "
                             "offloaded to CPU, K blocks fetched back per question and layer); "
                             "infinipot:budget=N or hermes:budget=N (at most N visual tokens per layer, "
                             "token-level eviction). Options: ,reindex=lazy|eager|off (window and budgets: "
                             "position re-indexing near the model's limit, default lazy), ,pooling=code "
                             "(infinipot), ,chunk_frames=F (hermes: one budget check per F frames)")
    parser.add_argument("--window", action=Renamed, new="--memory window:SECONDS")


def add_frame_options(parser, *, size_default=None, size_help: str = "") -> None:
    parser.add_argument("--fps", type=positive_float, default=1.0,
                        help="frames per second fed to the model (default 1)")
    parser.add_argument("--size", type=size, default=size_default, metavar="W|WxH",
                        help=size_help or "resize frames: W sets the longer side (aspect kept), WxH both "
                                          "(a note says when that changes the aspect ratio); default: as decoded")


def add_max_new_tokens(parser, default: int) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=default, metavar="N",
                        help="longest answer in tokens (default %(default)s)")


# ---------------------------------------------------------------------------- checks
def pruner_params(keep_ratio: float | None, params: dict) -> dict:
    """The pruner's keyword arguments for ``--keep-ratio`` and ``--param``."""
    return {**params, "keep_ratio": keep_ratio} if keep_ratio is not None else dict(params)


def check(parser: argparse.ArgumentParser, args: argparse.Namespace, cacher_auto: bool = False) -> None:
    """Checks across options, shared by the commands (errors: :meth:`Parser.error`). Leaves
    ``args.params`` (a dict) and ``args.cacher`` (the cacher's parameters, or None).
    ``cacher_auto``: ``--cacher`` not given means "when the cacher is installed" (bench)."""
    if getattr(args, "num_layers", None) or getattr(args, "vision_depth", None):
        if args.model is not None and not args.model.startswith("random:"):
            parser.error("--num-layers and --vision-depth apply to random: architectures only")
    args.params = dict(args.param)
    methods = [m for m in (args.method if isinstance(args.method, tuple) else (args.method,)) if m != NO_PRUNING]
    if not methods and (args.keep_ratio is not None or args.params):
        parser.error("--keep-ratio and --param need a --method (streampress list)")
    if methods:
        from streampress import create_pruner

        for name in methods:
            try:  # the pruner checks its own parameters; building one is cheap
                create_pruner(name, **pruner_params(args.keep_ratio, args.params))
            except (TypeError, ValueError) as exc:
                parser.error(f"--method {name}: {exc}")
    given = {k: getattr(args, f"cacher_{k}") for k in CACHER_PARAMS}
    given = {k: v for k, v in given.items() if v is not None}
    on = args.cacher
    if on is None and cacher_auto:
        import importlib.util

        on = importlib.util.find_spec("streampress.cacher") is not None
    if on:
        args.cacher = {**{k: v for k, (v, _) in CACHER_PARAMS.items() if v is not None}, **given}
    elif given:
        parser.error(f"--cacher-{next(iter(given)).replace('_', '-')} applies with --cacher")
    else:
        args.cacher = None
