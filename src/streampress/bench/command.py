"""``streampress bench``: resolve the defaults, load frames and model, measure, write the report."""

from __future__ import annotations

import importlib
import json
import time

import numpy as np

from .runner import DEFAULT_FRAMES, DEFAULT_METHODS, DEFAULT_MODEL, DEFAULT_MODEL_CUTS, DEFAULT_SIZE

__all__ = ["bench_command"]


def _cacher_settings(args) -> dict | None:
    """The cacher run's parameters, or None when it is off (``--no-cacher``) or not installed."""
    if args.cacher is False:
        return None
    try:
        importlib.import_module("streampress.cacher")
    except ImportError as exc:
        if args.cacher:
            raise ValueError(f"--cacher: the cacher is not available in this installation ({exc})") from None
        return None
    return {"rho": args.rho, "interval": args.interval, "refresh_threshold": args.refresh_threshold}


def _frames(args) -> tuple[np.ndarray, list[float], str]:
    count = args.frames or DEFAULT_FRAMES
    size = args.size or DEFAULT_SIZE
    if args.video is None:
        from .synthetic import synthetic_video

        wh = (size, size) if isinstance(size, int) else size
        frames, times = synthetic_video(count, size=wh, fps=args.fps)
        return frames, times, "synthetic (moving shapes, static stretch, generated in memory)"
    from streampress.video import open_video

    with open_video(args.video, fps=args.fps, max_frames=count, size=size) as source:
        batch = next(source.chunks(count), None)  # max_frames=count: one chunk holds them all
    if batch is None:
        raise ValueError(f"{args.video}: no frames decoded")
    return (*batch, str(args.video))


def bench_command(args) -> int:
    from rich.console import Console

    from streampress.cli import load_model, progress_bar
    from streampress.pruners.registry import resolve_name

    from .report import render_table, write_report
    from .runner import default_runs, run_bench

    started = time.perf_counter()
    methods = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    methods = [resolve_name(m).name for m in methods]  # unknown names fail before any heavy work
    cacher = _cacher_settings(args)
    err = Console(stderr=True)
    with progress_bar(args.quiet) as progress:
        task = progress.add_task("preparing frames", total=None)
        frames, times, video = _frames(args)
        progress.update(task, description="building the model")
        name = args.model or DEFAULT_MODEL
        cuts = {}
        if args.model is None:
            cuts = {k: v for k, v in DEFAULT_MODEL_CUTS.items()
                    if getattr(args, k, None) is None}  # explicit --num-layers/--vision-depth win
        model = load_model(args, name, **cuts)
        progress.remove_task(task)
        runs = default_runs(methods, args.keep_ratio, cacher)
        result = run_bench(model, frames, times, runs, question=args.question, repeats=args.repeats,
                           progress=progress)
    config = result["config"]
    config.update(model=name + (" (" + ", ".join(f"{k}={v}" for k, v in cuts.items()) + ")" if cuts else ""),
                  video=video, fps=args.fps, keep_ratio=args.keep_ratio, methods=methods,
                  cacher=cacher, wall_seconds=round(time.perf_counter() - started, 1))
    paths = write_report(result, args.out)
    out = err if args.json else Console()
    out.print(render_table(result))
    out.print("wrote " + ", ".join(str(p) for p in paths.values())
              + f" in {config['wall_seconds']:.0f} s")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0
