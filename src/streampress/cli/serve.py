"""``streampress serve``: live video streams over a WebSocket (OpenAI Realtime events) and HTTP.

Loads one model and serves it to many streams (see :mod:`streampress.serve`); binds to
loopback unless ``--host`` says otherwise; stops cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from ..serve.config import Limits
from . import model as model_arg
from . import options

__all__ = ["add_parser", "main", "settings_of", "limits_of"]

PROG = "streampress serve"
MAX_NEW_TOKENS = 64


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "serve", parents=[common], help="serve live video streams (WebSocket and HTTP)",
        description="Serve a model to live video streams: a WebSocket at /v1/realtime speaking the OpenAI "
                    "Realtime API's text and image events, an HTTP API at /v1/streams, /health and /metrics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  streampress serve --model random:qwen2.5-vl-tiny\n"
               "  streampress serve --model Qwen/Qwen2.5-VL-7B-Instruct --method streaming_assistant "
               "--keep-ratio 0.25 \\\n      --memory window:120 --api-key $KEY --max-sessions 8\n\n"
               "The method, budget, memory, cacher and fps given here are the defaults of each stream; a client\n"
               "changes its own with session.update (or in the body of POST /v1/streams).")
    options.add_model_options(p, required=True, cuts=True)
    options.add_method_options(p)
    options.add_cacher_options(p)
    g = p.add_argument_group("frames and memory (per stream defaults)")
    options.add_frame_options(g, size_help="resize incoming frames as they are decoded: W sets the longer side, "
                                           "WxH both (default: as sent)")
    options.add_memory_option(g)
    options.add_max_new_tokens(g, MAX_NEW_TOKENS)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=options.count, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on every endpoint and the socket "
                        "(default: $STREAMPRESS_API_KEY, else none)")
    g.add_argument("--allow-pull", action="store_true",
                   help="let clients create streams the server reads itself (files, URLs, cameras here)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    g = p.add_argument_group("limits")
    d = Limits()  # the defaults live in one place: streampress.serve.config.Limits
    g.add_argument("--max-sessions", type=options.positive_int, default=d.max_sessions, metavar="N",
                   help=f"streams open at once (default {d.max_sessions})")
    g.add_argument("--idle-timeout", type=options.positive_float, default=d.idle_timeout, metavar="SECONDS",
                   help=f"close a stream idle this long and free its memory (default {d.idle_timeout:g})")
    g.add_argument("--queue-frames", type=options.positive_int, default=d.queue_frames, metavar="N",
                   help=f"frames waiting per stream; beyond, the oldest waiting frame is dropped "
                        f"(default {d.queue_frames})")
    g.add_argument("--max-frame-bytes", type=options.positive_int, default=d.max_frame_bytes, metavar="BYTES",
                   help=f"largest encoded frame (default {d.max_frame_bytes // 2**20} MiB)")
    g.add_argument("--max-frame-pixels", type=options.positive_int, default=d.max_frame_pixels, metavar="N",
                   help=f"largest frame in pixels, width x height (default {d.max_frame_pixels})")
    g.add_argument("--max-push-rate", type=options.positive_float, default=d.max_push_rate, metavar="FPS",
                   help=f"frames a stream may send per second of wall-clock time (default {d.max_push_rate:g})")
    g.add_argument("--max-fps", type=options.positive_float, default=d.max_fps, metavar="FPS",
                   help=f"highest fps a stream may ask for (default {d.max_fps:g})")
    g.add_argument("--max-question-chars", type=options.positive_int, default=d.max_question_chars, metavar="N",
                   help=f"longest question (default {d.max_question_chars} characters)")
    p.set_defaults(func=main, check=partial(check, p))


def check(parser, args) -> None:
    options.check(parser, args)
    if args.api_key is None:
        args.api_key = os.environ.get("STREAMPRESS_API_KEY") or None
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key: expected some text")
    if args.fps > args.max_fps:
        parser.error(f"--fps {args.fps:g} is above --max-fps {args.max_fps:g}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        parser.error(f"serving needs {exc.name}: pip install 'streampress[serve]'")


def limits_of(args):
    return Limits(max_sessions=args.max_sessions, max_frame_bytes=args.max_frame_bytes,
                  max_frame_pixels=args.max_frame_pixels, max_push_rate=args.max_push_rate, max_fps=args.max_fps,
                  max_question_chars=args.max_question_chars,
                  max_new_tokens=max(Limits.max_new_tokens, args.max_new_tokens),
                  queue_frames=args.queue_frames, idle_timeout=args.idle_timeout)


def settings_of(args):
    from streampress.serve import StreamSettings

    return StreamSettings(method=args.method, keep_ratio=args.keep_ratio, params=dict(args.params),
                          memory=options.memory_text(args.memory), cacher=args.cacher, fps=args.fps,
                          max_new_tokens=args.max_new_tokens)


def main(args) -> int:
    from streampress.serve import Engine, create_app
    from streampress.serve.server import run

    checkpoint = model_arg.resolve_model(args.model)
    if not args.quiet:
        print(f"{PROG}: loading {args.model}", file=sys.stderr, flush=True)
    model = model_arg.load(args, checkpoint)
    engine = Engine(model, settings_of(args), limits_of(args), model_name=args.model, size=args.size)
    app = create_app(engine, api_key=args.api_key, allow_pull=args.allow_pull)
    if not args.quiet:
        where = f"http://{args.host}:{args.port}"
        print(f"{PROG}: {args.model} on {where} (WebSocket {where.replace('http', 'ws', 1)}/v1/realtime)"
              + (", API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    run(app, args.host, args.port, log_level="warning" if args.quiet else args.log_level)
    return 0
