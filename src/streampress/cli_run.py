"""``streampress run``: stream a video through a session and answer questions at their times.

The command-line layer only: it opens the video, builds the model, pruner, cacher and memory
policy from the parsed arguments, feeds frames in time order and prints answers and stats.
"""

from __future__ import annotations

import json
import math
import time

from streampress.bench.report import format_bytes, json_default
from streampress.cli import Question, load_model, make_pruner, parse_memory, progress_bar


def cmd_run(args) -> int:
    from streampress.video import FrameBuffer, open_video

    started = time.perf_counter()
    questions = sorted(args.questions, key=lambda q: q.time)
    # The video first: a missing or broken file fails at once, before torch is even imported.
    source = open_video(args.video, fps=args.fps, max_frames=args.max_frames, size=args.size)
    memory = parse_memory(args.memory)
    pruner = make_pruner(args.method, args.keep_ratio, dict(args.param))  # bad names fail before loading
    from streampress import StreamingSession, create_cacher

    model = load_model(args, args.model)
    cacher_params = ({"rho": args.rho, "interval": args.interval, "refresh_threshold": args.refresh_threshold}
                     if args.cacher else None)
    cacher = create_cacher(**cacher_params) if cacher_params else None
    session = StreamingSession(model, pruner=pruner, cacher=cacher, memory=memory)
    buffer = FrameBuffer(args.chunk_frames or model.frames_per_item)
    answers, seen, now = [], 0, 0.0

    def flush():
        batch = buffer.pop()
        if batch is not None:
            session.add_frames(*batch)

    def answer(q: Question, at_end: bool):
        flush()
        t0 = time.perf_counter()
        reply = session.ask(q.text, max_new_tokens=args.max_new_tokens, options=q.options)
        pending = int(session.stats().get("pending_frames", 0))  # waiting for the rest of their item
        record = {"time": None if math.isinf(q.time) else q.time, "stream_time": now, "frames_seen": seen,
                  "frames_pending": pending, "question": q.text, "options": q.options, "answer": getattr(reply, "text", str(reply)),
                  "choice": getattr(reply, "choice", None), "seconds": time.perf_counter() - t0,
                  "after_end": at_end and not math.isinf(q.time) and q.time > now}
        answers.append(record)
        if not args.json:
            _print_answer(record)

    if not args.json:
        info = source.info
        print(f"{info.source}: {info.width}x{info.height}, "
              + (f"{info.duration:.1f} s, " if info.duration else "live, ")
              + f"fed at {args.fps:g} fps | model {args.model} | method {args.method or 'dense'}"
              + (" + cacher" if cacher else ""))
    with progress_bar(args.quiet) as progress:
        task = progress.add_task("streaming", total=source.estimated_frames())
        for frame in source:
            while questions and frame.timestamp > questions[0].time + 1e-9:
                answer(questions.pop(0), at_end=False)
            seen, now = seen + 1, frame.timestamp
            if buffer.push(frame.image, frame.timestamp):
                flush()
            progress.advance(task)
        flush()
        while questions:
            answer(questions.pop(0), at_end=True)
    stats = session.stats()
    wall = time.perf_counter() - started
    if args.json:
        print(json.dumps({"video": source.info._asdict(), "model": model.describe(),
                          "method": {"name": args.method or "dense", "params": pruner.params if pruner else {}},
                          "cacher": cacher_params,
                          "memory": args.memory, "fps": args.fps, "answers": answers, "stats": stats,
                          "wall_seconds": wall}, indent=2, default=json_default))
    else:
        _print_stats(stats, wall)
    return 0


def _print_answer(r: dict) -> None:
    when = "end" if r["time"] is None else f"{r['time']:.1f} s"
    late = f" (video ended at {r['stream_time']:.1f} s)" if r["after_end"] else ""
    print(f"[{when}{late}] Q: {r['question']}")
    if r["options"]:
        print("    options: " + "  ".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(r["options"])))
    choice = f" -> {r['choice']}" if r["choice"] else ""
    text = r["answer"] if r["answer"].isprintable() else repr(r["answer"])  # random weights: any bytes
    pending = f", {r['frames_pending']} held until its item is complete" if r["frames_pending"] else ""
    print(f"    A: {text}{choice}   ({r['frames_seen']} frames seen{pending}, {r['seconds']:.2f} s)")


def _print_stats(stats: dict, wall: float) -> None:
    print("statistics:")
    for key, value in _flatten(stats):
        if key.endswith("bytes") and isinstance(value, (int, float)):
            value = format_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        print(f"    {key}: {value}")
    print(f"    wall time: {wall:.2f} s")


def _flatten(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json_default(value) if hasattr(value, "tolist") else value
