"""The streaming protocol: how one video's frames and questions meet a session.

Stream mode (the default): one session per video. Frames go in, in time order, in chunks of
``chunk_frames``; when the stream reaches a question's time (every frame with timestamp
<= t has been added), the question is asked; the session's ``ask`` rolls the question and
its answer back, so the stream continues as if it had never been asked.

Clip mode: a new session per question, fed the frames from 0 to the question's time, as
the benchmarks' published drivers do (each question re-encodes its clip).

Chunk boundaries are a function of the video, the fps, ``chunk_frames`` and the times of
*all* the video's questions in the annotation file (``stop_times``), never of which
questions remain to be asked. A resumed or sharded run therefore feeds every session the
same chunks as an uninterrupted run and gets bit-identical answers.

A session is anything with ``add_frames(frames, timestamps)``, ``ask(text, max_new_tokens=)``
returning a string or an object with ``.text``, and optionally ``stats() -> dict`` and
``question_logits(text) -> [V]`` (used when ``top_logits > 0`` to record the k largest
first-token logits: a fine-grained fingerprint of what the model saw, for comparing runs
and methods beyond the argmax answer).

With ``proactive=True`` (stream mode, OVO-Bench forward tasks) the session also holds one
watch per forward prompt (:mod:`.proactive`), registered before the first frame; each
forward question's record then carries, beside the probe-mode answer, the watch's answer
standing at the question's time. A watch probe, like a question, leaves no trace, so the
two modes do not see each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from streampress.video import FrameBuffer

from .datasets import Question
from .proactive import Watches
from .prompts import build_prompt

EPS = 1e-6
Frames = Iterable[tuple[np.ndarray, float]]
# emit(question, response_text, info) is called once per answered question, in order.
Emit = Callable[[Question, str, dict], None]


def ask_time(q: Question) -> float:
    """When ``q`` is asked: its time, or after the whole video (inf) for offline questions.

    A NaN time would compare false with every frame time: the stream would never reach that
    question, nor, as questions are asked in time order, any question after it. The readers
    refuse such times; this refuses them from any other source.
    """
    if q.time is None:
        return math.inf
    t = float(q.time)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"question {q.qid}: expected a finite time >= 0 in seconds, got {q.time!r}")
    return t


def flat_stats(session) -> dict:
    """``session.stats()`` as a flat dict of JSON scalars (nested dicts become ``a.b`` keys)."""
    fn = getattr(session, "stats", None)
    if fn is None:
        return {}
    out: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[prefix[:-1]] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensor / array
            out[prefix[:-1]] = value.item()

    walk("", fn())
    return out


class _Feeder:
    """Buffers frames and hands them to one session in chunks; asks questions on demand."""

    def __init__(self, session, chunk_frames: int, max_new_tokens: int, emit: Emit, session_key: str,
                 top_logits: int = 0, watches: Watches | None = None):
        self.session = session
        self.watches = watches
        self.max_new_tokens, self.emit, self.key = max_new_tokens, emit, session_key
        self.top_logits = top_logits
        self.buffer = FrameBuffer(int(chunk_frames))
        self.seen, self.last_time = 0, None
        self.mark = time.perf_counter()

    def push(self, image: np.ndarray, t: float) -> None:
        if self.buffer.push(image, t):
            self.flush()

    def flush(self) -> None:
        batch = self.buffer.pop()
        if batch is None:
            return
        images, times = batch
        self.session.add_frames(images, times)
        self.seen += len(times)
        self.last_time = times[-1]

    def ask(self, q: Question) -> None:
        self.flush()
        prompt = build_prompt(q)
        t0 = time.perf_counter()
        answer = self.session.ask(prompt, max_new_tokens=self.max_new_tokens)
        t1 = time.perf_counter()
        text = answer if isinstance(answer, str) else answer.text
        info = {"session": self.key, "frames": self.seen, "stream_time": self.last_time, "ask_s": t1 - t0}
        if hasattr(answer, "items"):  # what the question saw (a pending frame's temporary item included)
            info.update(items_seen=answer.items, visual_tokens_seen=answer.visual_tokens)
        if self.top_logits > 0:
            logits = self.session.question_logits(prompt).float().reshape(-1)
            values, ids = logits.topk(min(self.top_logits, logits.numel()))
            info["first_token_top"] = [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist())]
        if self.watches is not None and self.watches.covers(q):
            info.update(self.watches.answer(q))
        now = time.perf_counter()
        info.update(elapsed_s=now - self.mark, stats=flat_stats(self.session))
        self.mark = now
        self.emit(q, text, info)


@contextmanager
def _iterating(frames: Frames) -> Iterator[Iterator]:
    """An iterator over ``frames`` that is closed on leaving (a generator stops decoding at once)."""
    it = iter(frames)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def run_stream(frames: Frames, todo: list[Question], stop_times: Iterable[float], session,
               emit: Emit, chunk_frames: int = 16, max_new_tokens: int = 16,
               session_key: str = "", top_logits: int = 0, proactive: bool = False) -> None:
    """Stream one video through ``session``, asking each question of ``todo`` at its time.

    ``stop_times``: the times of all the video's questions (answered or not); the buffer is
    flushed at each of them. Decoding stops once every question of ``todo`` is answered.
    ``proactive``: also watch the forward questions (see the module docstring).
    """
    if not todo:
        return
    todo = sorted(todo, key=lambda q: (ask_time(q), q.qid))
    stops = sorted(set(stop_times) | {ask_time(q) for q in todo})
    last_needed = ask_time(todo[-1])
    watches = Watches(session, todo, max_new_tokens) if proactive else None
    feed = _Feeder(session, chunk_frames, max_new_tokens, emit, session_key, top_logits, watches)
    qi = si = 0

    def answer_upto(t: float) -> None:
        nonlocal qi
        while qi < len(todo) and ask_time(todo[qi]) <= t + EPS:
            feed.ask(todo[qi])
            qi += 1

    with _iterating(frames) as it:
        for image, ts in it:
            while si < len(stops) and stops[si] + EPS < ts:
                feed.flush()
                answer_upto(stops[si])
                si += 1
            if ts > last_needed + EPS:
                break
            feed.push(image, ts)
    feed.flush()
    answer_upto(math.inf)


def run_clips(open_frames: Callable[[], Frames], todo: list[Question], new_session: Callable[[], object],
              emit: Emit, chunk_frames: int = 16, max_new_tokens: int = 16, session_key: str = "",
              top_logits: int = 0) -> None:
    """Clip mode: for each question a new session fed frames 0..t, then the question."""
    for q in sorted(todo, key=lambda q: (ask_time(q), q.qid)):
        feed = _Feeder(new_session(), chunk_frames, max_new_tokens, emit, f"{session_key}@{q.qid}", top_logits)
        limit = ask_time(q)
        with _iterating(open_frames()) as it:
            for image, ts in it:
                if ts > limit + EPS:
                    break
                feed.push(image, ts)
        feed.ask(q)
