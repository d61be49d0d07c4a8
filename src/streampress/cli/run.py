"""``streampress run``: stream a video through a session and answer questions at their times.

The video (a file, a folder of images, a stream URL, a camera index or device, or the built-in
``synthetic`` clip) is fed in real-time order; each question (``--ask``, or a ``--questions``
file) is answered when the stream reaches its time, from everything seen so far. Answers are
printed as they come (``--json``: one object at the end) and, with ``--out``, written to a
JSONL file one line per answer as it is given, so a video that breaks off keeps the answers
given before the break.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import NamedTuple

from ..formatting import format_bytes, json_default
from . import model as model_arg
from . import options
from .progress import progress

__all__ = ["Question", "parse_time", "parse_question", "read_questions", "stream_answers", "add_parser", "main"]

PROG = "streampress run"
MAX_NEW_TOKENS = 32
TIME_FORMS = "SECONDS, MM:SS (seconds below 60), HH:MM:SS or end"
EXAMPLE = "'12.5: What is on the table?'"


class Question(NamedTuple):
    """A question asked when the stream reaches ``time`` seconds (``inf``: at the end)."""

    time: float
    text: str
    options: list[str] | None = None


# ---------------------------------------------------------------------------- questions
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_TIME_QUESTION = re.compile(r"^\s*(?P<time>end|(?:\d+:){0,2}(?:\d+(?:\.\d*)?|\.\d+))\s*:\s*(?P<text>\S.*)$", re.S)


def parse_time(text: str) -> float:
    """``12.5`` / ``1:05`` / ``1:02:03.5`` -> seconds; ``end`` -> ``inf``. Minutes and seconds
    after the first part are below 60. Raises ValueError naming the accepted forms."""
    stamp = str(text).strip()
    if stamp == "end":
        return math.inf
    parts = stamp.split(":")
    if (len(parts) > 3 or not all(_NUMBER.fullmatch(p) for p in parts) or any("." in p for p in parts[:-1])
            or any(float(p) >= 60 for p in parts[1:])):
        raise ValueError(f"expected {TIME_FORMS}, got {text!r}")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def parse_question(text: str) -> Question:
    """``--ask``: ``"12.5: What is on the table?"`` (also ``"1:05: ..."``, ``"end: ..."``)."""
    match = _TIME_QUESTION.match(text)
    if not match:
        options.fail(f"expected 'TIME: question' with TIME as {TIME_FORMS} (e.g. {EXAMPLE}), got {text!r}")
    try:
        return Question(parse_time(match["time"]), match["text"].strip())
    except ValueError:
        options.fail(f"{match['time']!r} is no time: expected {TIME_FORMS}, in {text!r}")


def _question_entry(entry) -> Question:
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object with time, question (and options), got {entry!r}")
    if "time" not in entry or "question" not in entry:
        raise ValueError(f"field {'time' if 'time' not in entry else 'question'!r}: missing")
    t, text, choices = entry["time"], entry["question"], entry.get("options")
    if isinstance(t, bool) or not isinstance(t, (int, float, str)):
        raise ValueError(f"field 'time': expected {TIME_FORMS}, got {t!r}")
    if isinstance(t, str):
        try:
            t = parse_time(t)
        except ValueError:
            raise ValueError(f"field 'time': expected {TIME_FORMS}, got {t!r}") from None
    if not (t >= 0 and (math.isfinite(t) or t == math.inf)):
        raise ValueError(f"field 'time': expected seconds >= 0, got {t!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field 'question': expected a non-empty string, got {text!r}")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ValueError(f"field 'options': expected a list of at least two strings, got {choices!r}")
    return Question(float(t), text.strip(), choices)


def read_questions(path: str) -> list[Question]:
    """``--questions FILE``: a JSON list, or JSONL (one object a line), of ``{"time": 12.5 |
    "1:05" | "end", "question": "...", "options": ["...", ...]}`` (options optional)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        options.fail(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})")
    if text.lstrip().startswith("["):
        try:
            entries = [(f"entry {i}", e) for i, e in enumerate(json.loads(text))]
        except json.JSONDecodeError as exc:
            options.fail(f"{path}: not valid JSON ({exc})")
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    options.fail(f"{path} line {n}: not valid JSON ({exc})")
    questions = []
    for where, entry in entries:
        try:
            questions.append(_question_entry(entry))
        except ValueError as exc:
            options.fail(f"{path} {where}: {exc}")
    return questions or options.fail(f"{path}: no questions")


class _AskAction(argparse.Action):
    """``--ask`` appends a Question; ``--options`` attaches choices to the last one."""

    def __call__(self, parser, namespace, values, option_string=None):
        asked = list(getattr(namespace, self.dest, None) or [])
        if option_string == "--options":
            if not asked:
                parser.error("--options must follow the --ask it belongs to")
            choices = [o.strip() for o in values.split(";") if o.strip()]
            if len(choices) < 2:
                parser.error(f"--options: expected at least two choices separated by ';', got {values!r}")
            asked[-1] = asked[-1]._replace(options=choices)
        else:
            asked.append(values)
        setattr(namespace, self.dest, asked)


# ---------------------------------------------------------------------------- parser
def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "run", parents=[common], help="answer timed questions on a video",
        description="Stream a video in real-time order and answer each question at its time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  streampress run synthetic --model random:qwen2.5-vl-tiny --ask '3: What moves?'\n"
               "  streampress run clip.mp4 --model Qwen/Qwen2.5-VL-7B-Instruct --method streaming_assistant \\\n"
               "      --ask '1:05: What color is the cup?' --options 'red;blue;green' --ask 'end: Summary?'\n"
               "  streampress run 0 --model random:qwen2.5-vl-tiny --questions questions.jsonl --out answers.jsonl\n\n"
               f"TIME is {TIME_FORMS}. A --questions file is a JSON list or JSONL of\n"
               '{"time": 12.5, "question": "...", "options": ["...", "..."]} (options optional).')
    p.add_argument("video", type=options.video, metavar="VIDEO",
                   help="video file, folder of images, stream URL (rtsp://, http://, udp://), camera index "
                        "(0) or device (/dev/video0), or synthetic[:SECONDS] (the built-in clip, default 8 s)")
    options.add_model_options(p, required=True, cuts=True)
    options.add_method_options(p)
    options.add_cacher_options(p)
    g = p.add_argument_group("frames and memory")
    options.add_frame_options(g)
    g.add_argument("--max-frames", type=options.positive_int, default=None, metavar="N",
                   help="stop after N frames")
    g.add_argument("--chunk-frames", type=options.positive_int, default=None, metavar="N",
                   help="frames per add_frames call (default: one model item, e.g. 2 for Qwen)")
    options.add_memory_option(g)
    g = p.add_argument_group("questions and answers")
    g.add_argument("--ask", dest="ask", action=_AskAction, type=parse_question, default=[], metavar="'TIME: QUESTION'",
                   help="a question asked when the stream reaches TIME (repeatable)")
    g.add_argument("--options", action=_AskAction, dest="ask", metavar="'A;B;C'",
                   help="multiple-choice options of the preceding --ask")
    g.add_argument("--questions", type=read_questions, default=[], metavar="FILE",
                   help="questions from a JSON or JSONL file (with or instead of --ask)")
    options.add_max_new_tokens(g, MAX_NEW_TOKENS)
    g.add_argument("--out", default=None, metavar="ANSWERS.jsonl",
                   help="also write each answer, as it is given, as one JSON line to this file")
    g.add_argument("--watch", action="append", default=[], metavar="QUESTION",
                   help="a standing question answered proactively when the scene changes (repeatable); "
                        "each answer that differs from the last is printed with its stream time")
    g.add_argument("--watch-interval", type=options.non_negative_float, default=0.0, metavar="SECONDS",
                   help="fewest stream seconds between two probes of a watch (default 0)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=main, check=partial(check, p))


def check(parser, args) -> None:
    options.check(parser, args)
    args.questions = sorted([*args.ask, *args.questions], key=lambda q: q.time)  # stable: given order


# ---------------------------------------------------------------------------- sources
class SyntheticClip:
    """The built-in clip (:func:`streampress.bench.synthetic.synthetic_video`: moving shapes
    on a textured background with a static stretch) as a frame source like ``open_video``'s."""

    def __init__(self, seconds: float, fps: float, size=None, max_frames: int | None = None):
        from streampress.bench.runner import DEFAULT_SIZE
        from streampress.bench.synthetic import synthetic_video
        from streampress.video import VideoInfo

        n = max(1, math.floor(seconds * fps + 1e-9))
        n = min(n, max_frames) if max_frames else n
        width, height = (size, size) if isinstance(size, int) else (size or DEFAULT_SIZE)
        self.frames, self.times = synthetic_video(n, size=(width, height), fps=fps)
        self.info = VideoInfo(f"synthetic:{seconds:g}", "synthetic", width, height, fps, n / fps, n)

    def estimated_frames(self) -> int:
        return len(self.frames)

    def __iter__(self):
        from streampress.video import Frame

        return (Frame(image, t, i) for i, (image, t) in enumerate(zip(self.frames, self.times)))

    def close(self) -> None:
        pass


def open_source(args, note: Callable[[str], None]):
    """The frame source of ``args.video``; a ``--size WxH`` that changes the video's aspect
    ratio is reported through ``note``."""
    if isinstance(args.video, options.Synthetic):
        return SyntheticClip(args.video.seconds, args.fps, args.size, args.max_frames)
    from streampress.video import open_video

    exact = isinstance(args.size, tuple)
    source = open_video(args.video, fps=args.fps, max_frames=args.max_frames, size=None if exact else args.size)
    if exact:  # the first opening tells the decoded size
        text = options.aspect_note(args.size, source.info.width, source.info.height)
        if text:
            note(text)
        source.close()
        source = open_video(args.video, fps=args.fps, max_frames=args.max_frames, size=args.size)
    return source


# ---------------------------------------------------------------------------- the stream
def stream_answers(frames: Iterable, questions: list[Question], session, chunk_frames: int, max_new_tokens: int,
                   warn: Callable[[str], None] = lambda text: None,
                   on_frame: Callable[[], None] = lambda: None) -> Iterator[dict]:
    """Feed ``frames`` (objects with ``image`` and ``timestamp``) to ``session`` in chunks of
    ``chunk_frames``; yield one record per question (``kind: "answer"``), answered as soon as
    a frame later than its time arrives (after the frames before it), ``end`` questions after
    the last frame, and one per proactive answer of the session's watches (``kind:
    "watch"``) as the chunk that triggered it is added. A question asked before any frame
    is answered without video, and ``warn`` says so."""
    from streampress.video import FrameBuffer

    pending = sorted(questions, key=lambda q: q.time)
    buffer = FrameBuffer(chunk_frames)
    seen, now = 0, 0.0

    def flush():
        batch = buffer.pop()
        if batch is not None:
            session.add_frames(*batch)
        return [watch_record(e) for e in session.poll_events()] if hasattr(session, "poll_events") else []

    def watch_record(e) -> dict:
        return {"kind": "watch", "watch": e.watch.question, "stream_time": e.time, "trigger_time": e.trigger_time,
                "answer": e.text, **({"error": e.error} if e.error else {})}

    def answer(q: Question, at_end: bool) -> dict:
        when = "end" if math.isinf(q.time) else f"{q.time:g} s"
        if seen == 0:
            warn(f"the question at {when} comes before the first frame; it is answered without video")
        t0 = time.perf_counter()
        reply = session.ask(q.text, max_new_tokens=max_new_tokens, options=q.options)
        return {"kind": "answer", "time": None if math.isinf(q.time) else q.time, "stream_time": now,
                "frames_seen": seen, "items_seen": getattr(reply, "items", None),
                "question": q.text, "options": q.options, "answer": getattr(reply, "text", str(reply)),
                "choice": getattr(reply, "choice", None), "seconds": time.perf_counter() - t0,
                "after_end": at_end and not math.isinf(q.time) and q.time > now}

    for frame in frames:
        if pending and frame.timestamp > pending[0].time + 1e-9:
            yield from flush()  # the frames before the question, and what watches said about them
            while pending and frame.timestamp > pending[0].time + 1e-9:
                yield answer(pending.pop(0), at_end=False)
        seen, now = seen + 1, frame.timestamp
        if buffer.push(frame.image, frame.timestamp):
            yield from flush()
        on_frame()
    yield from flush()
    while pending:
        yield answer(pending.pop(0), at_end=True)


def _say(kind: str, text: str) -> None:
    print(f"{PROG}: {kind}: {text}", file=sys.stderr, flush=True)


def main(args) -> int:
    started = time.perf_counter()
    # What can fail at once does, before torch is imported: the video, the model name, --out.
    source = open_source(args, lambda text: _say("note", text))
    try:
        checkpoint = model_arg.resolve_model(args.model)
        with _open_out(args.out) as out:
            return _run(args, source, checkpoint, out, started)
    finally:
        source.close()


def _open_out(path: str | None):
    if path is None:
        return nullcontext()
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise OSError(f"--out {path}: cannot write it ({exc.strerror})") from None


def _run(args, source, checkpoint: str, out, started: float) -> int:
    from streampress import StreamingSession, create_cacher, create_pruner
    from streampress.video import VideoError

    with progress(PROG, args.quiet) as bar:
        stage = bar.add_task(f"loading {args.model}")
        model = model_arg.load(args, checkpoint)
        bar.remove_task(stage)
        pruner = (None if args.method == options.NO_PRUNING
                  else create_pruner(args.method, **options.pruner_params(args.keep_ratio, args.params)))
        cacher = create_cacher(**args.cacher) if args.cacher else None
        session = StreamingSession(model, pruner=pruner, cacher=cacher, memory=options.memory_policy(args.memory))
        for question in args.watch:
            session.watch(question, min_interval=args.watch_interval, max_new_tokens=args.max_new_tokens)
        if not args.json:
            info = source.info
            print(f"{info.source}: {info.width}x{info.height}, "
                  + (f"{info.duration:.1f} s, " if info.duration else "live, ")
                  + f"fed at {args.fps:g} fps | model {args.model} | method {args.method}"
                  + (" + cacher" if cacher else "") + f" | memory {options.memory_text(args.memory)}")
        total = source.estimated_frames()
        task = bar.add_task("streaming" + (f" {total} frames" if total else ""), total=total)
        answers, watched = [], []
        try:
            for record in stream_answers(source, args.questions, session, args.chunk_frames or model.frames_per_item,
                                         args.max_new_tokens, lambda text: _say("warning", text),
                                         lambda: bar.advance(task)):
                (watched if record["kind"] == "watch" else answers).append(record)
                if out is not None:
                    out.write(json.dumps(record, default=json_default) + "\n")
                    out.flush()
                if not args.json:
                    _print_answer(record)
        except VideoError as exc:  # the answers given so far are printed / written already
            if args.json:
                _print_json(args, source, model, pruner, answers, watched, session.stats(), started,
                            error=str(exc))
            raise
    if args.json:
        _print_json(args, source, model, pruner, answers, watched, session.stats(), started)
    else:
        _print_stats(session.stats(), time.perf_counter() - started)
    return 0


def _print_json(args, source, model, pruner, answers, watched, stats, started, error=None) -> None:
    result = {"video": source.info._asdict(), "model": model.describe(),
              "method": {"name": args.method, "params": pruner.params if pruner else {}},
              "cacher": args.cacher, "memory": options.memory_text(args.memory), "fps": args.fps,
              "answers": answers, "watch_events": watched, "stats": stats,
              "wall_seconds": time.perf_counter() - started}
    if error is not None:
        result["error"] = error
    print(json.dumps(result, indent=2, default=json_default))


def _print_answer(r: dict) -> None:
    if r["kind"] == "watch":
        text = r["answer"] if r["answer"].isprintable() else repr(r["answer"])
        print(f"[{r['stream_time']:.1f} s, scene changed at {r['trigger_time']:.1f} s] watch: {r['watch']}")
        print(f"    A: {r.get('error') or text}", flush=True)
        return
    when = "end" if r["time"] is None else f"{r['time']:.1f} s"
    late = f" (video ended at {r['stream_time']:.1f} s)" if r["after_end"] else ""
    print(f"[{when}{late}] Q: {r['question']}")
    if r["options"]:
        print("    options: " + "  ".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(r["options"])))
    choice = f" -> {r['choice']}" if r["choice"] else ""
    text = r["answer"] if r["answer"].isprintable() else repr(r["answer"])  # random weights: any bytes
    print(f"    A: {text}{choice}   ({r['frames_seen']} frames seen, {r['seconds']:.2f} s)", flush=True)


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
