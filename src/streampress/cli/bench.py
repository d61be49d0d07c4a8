"""``streampress bench``: the dense baseline and each method on the same frames, in one process.

Resolves the defaults (those of :mod:`streampress.bench.runner`, shown in ``--help``), loads
the frames and the model, measures with :func:`~streampress.bench.runner.run_bench` and
writes the report (:mod:`streampress.bench.report`): a table, ``bench.json``, ``bench.md``
and ``bench.png``.
"""

from __future__ import annotations

import json
import time
from functools import partial

from streampress.bench.runner import DEFAULT_FRAMES, DEFAULT_METHODS, DEFAULT_MODEL, DEFAULT_MODEL_CUTS, DEFAULT_SIZE

from . import model as model_arg
from . import options
from .progress import progress

__all__ = ["add_parser", "main"]

PROG = "streampress bench"
KEEP_RATIO = 0.25
MAX_NEW_TOKENS = 8


def add_parser(subparsers, common) -> None:
    cuts = ", ".join(f"{k}={v}" for k, v in DEFAULT_MODEL_CUTS.items())
    side = max(DEFAULT_SIZE)
    p = subparsers.add_parser(
        "bench", parents=[common], help="speed/memory report: dense vs methods",
        description="Run the dense baseline and each method on the same frames in one process. With no "
                    "arguments: a reduced-size Qwen2.5-VL with random weights on a synthetic video "
                    "(no downloads).")
    p.add_argument("video", nargs="?", type=options.video, default=None, metavar="VIDEO",
                   help="video file or folder (default: synthetic, the built-in clip)")
    options.add_model_options(p, cuts=True, model_help=f"checkpoint folder, hub id OWNER/NAME or random:ARCH "
                                                       f"(default: {DEFAULT_MODEL} with {cuts})")
    options.add_method_options(p, several=True, default=DEFAULT_METHODS,
                               keep_ratio_help=f"matched budget in (0, 1] for every method (default "
                                               f"{KEEP_RATIO}, or each method's own rule with --param)")
    options.add_cacher_options(p, optional=True)
    options.add_memory_option(p)
    g = p.add_argument_group("frames")
    options.add_frame_options(g, size_help=f"frame size: W (the longer side, aspect kept) or WxH (default: "
                                           f"{options.size_text(DEFAULT_SIZE)} for the synthetic clip, "
                                           f"longer side {side} for a video)")
    g.add_argument("--frames", type=options.positive_int, default=DEFAULT_FRAMES, metavar="N",
                   help="frames to stream (default %(default)s)")
    g = p.add_argument_group("measurement and report")
    g.add_argument("--repeats", type=options.positive_int, default=1, metavar="N",
                   help="rounds over all runs, each with fresh sessions; times are medians over every "
                        "round's items (default 1)")
    g.add_argument("--question", type=options.nonblank, default="What is moving in the video?",
                   help="asked at the end of each round, 3 times per run, interleaved between runs")
    options.add_max_new_tokens(g, MAX_NEW_TOKENS)
    g.add_argument("--out", default="streampress-bench", metavar="FOLDER",
                   help="output folder (default ./streampress-bench/)")
    g.add_argument("--json", action="store_true", help="also print the result as JSON on stdout")
    p.set_defaults(func=main, check=partial(check, p))


def check(parser, args) -> None:
    if args.keep_ratio is None and not args.param and args.method:
        args.keep_ratio = KEEP_RATIO
    options.check(parser, args, cacher_auto=True)


def _frames(args, note):
    """``(frames, timestamps, description)`` of the synthetic clip or of ``args.video``."""
    if args.video is None or isinstance(args.video, options.Synthetic):
        from streampress.bench.synthetic import synthetic_video

        size = args.size or DEFAULT_SIZE
        frames, times = synthetic_video(args.frames, size=(size, size) if isinstance(size, int) else size,
                                        fps=args.fps)
        return frames, times, "synthetic (moving shapes, static stretch, generated in memory)"
    from streampress.video import open_video

    size = args.size or max(DEFAULT_SIZE)
    with open_video(args.video, fps=args.fps, max_frames=args.frames) as source:
        text = options.aspect_note(size, source.info.width, source.info.height)
    if text:
        note(text)
    with open_video(args.video, fps=args.fps, max_frames=args.frames, size=size) as source:
        batch = next(source.chunks(args.frames), None)  # max_frames: one chunk holds them all
    if batch is None:
        raise ValueError(f"{args.video}: no frames decoded")
    return (*batch, str(args.video))


def main(args) -> int:
    from rich.console import Console

    from streampress.bench.report import render_table, write_report
    from streampress.bench.runner import RunSpec, run_bench

    started = time.perf_counter()
    name = args.model or DEFAULT_MODEL
    checkpoint = model_arg.resolve_model(name)  # no hub: the local snapshot, or one line at once
    err = Console(stderr=True)
    with progress(PROG, args.quiet) as bar:
        task = bar.add_task("preparing frames", total=None)
        frames, times, video = _frames(args, lambda text: err.print(f"{PROG}: note: {text}", highlight=False))
        bar.update(task, description=f"loading {name}")
        cuts = {}
        if args.model is None:  # explicit --num-layers / --vision-depth win
            cuts = {k: v for k, v in DEFAULT_MODEL_CUTS.items() if getattr(args, k, None) is None}
        model = model_arg.load(args, checkpoint, **cuts)
        bar.remove_task(task)
        runs = [RunSpec("dense")]
        runs += [RunSpec(m, m, options.pruner_params(args.keep_ratio, args.params)) for m in args.method]
        if args.cacher is not None:
            runs.append(RunSpec("dense+cacher", None, {}, dict(args.cacher)))
        result = run_bench(model, frames, times, runs, question=args.question, max_new_tokens=args.max_new_tokens,
                           repeats=args.repeats, progress=bar, kv_memory=options.memory_policy(args.memory))
    config = result["config"]
    config.update(model=name + (" (" + ", ".join(f"{k}={v}" for k, v in cuts.items()) + ")" if cuts else ""),
                  video=video, fps=args.fps, keep_ratio=args.keep_ratio, methods=list(args.method),
                  params=args.params, cacher=args.cacher, memory=options.memory_text(args.memory),
                  wall_seconds=round(time.perf_counter() - started, 1))
    paths = write_report(result, args.out)
    out = err if args.json else Console()
    out.print(render_table(result))
    out.print("wrote " + ", ".join(str(p) for p in paths.values()) + f" in {config['wall_seconds']:.0f} s")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0
