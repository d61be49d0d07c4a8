"""The scheduler of ``streampress serve``: one model, many streams, one worker thread.

Every piece of model work (building a stream's session, ingesting frames, answering) runs on
one worker thread, in small units, so the model is never used by two threads at once and no
stream can hold it for long:

- **ingestion unit**: the frames that complete one model item (2 frames for Qwen), given to
  the stream's :class:`~streampress.StreamingSession` with ``add_frames``;
- **answer unit**: the question's prefill (up to its first token) or one more answer token.

Which unit runs next (under one lock, :meth:`Engine._next_unit`):

1. streams that were closed are finalised (an open answer is closed, which rolls the
   session back; the session is dropped);
2. new streams (or streams whose settings changed) get their session built;
3. **questions before backlog**: streams with a question or an open answer are served
   round-robin, one unit each; a question first ingests the frames that arrived before it
   (only those: frames sent after the question wait), then answers. Answers of several
   streams interleave token by token. So that a stream of questions cannot starve
   ingestion, one backlog unit runs after every :data:`ANSWER_BURST` answer units when
   backlog is waiting;
4. otherwise backlog: streams with a complete item queued are served round-robin.

**Ingestion never waits for answers**: pushing a frame only queues it (the request returns at
once). **Backlog policy**: each stream queues at most ``Limits.queue_frames`` frames; when a
frame arrives at a full queue the *oldest* waiting frame is dropped and counted
(``frames_dropped``): the stream keeps the newest frames when ingestion falls behind real
time. Frames are also thinned to the stream's ``fps`` (the first frame at or after each tick
k/fps of stream time is kept, the others are counted as ``frames_skipped``) before they are
decoded. A question is answered over every frame that arrived before it, less the ones
dropped by that policy.

Batching the encoder work of several streams is not done. :class:`StreamingSession` encodes,
prunes and prefills an item in one call, so batching needs a session API that separates
encoding from the rest. Measured on the tiny random Qwen model on 2 CPU cores (224x224
frames, encode of 1 / 4 / 8 items one by one vs in one call): 14 / 57 / 113 ms vs 11 / 43 /
94 ms, a gap no larger than the one item control's, i.e. within noise; on a GPU, where small
encoder calls are launch-bound, it is likely to help and is the next step.
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import Limits, ServeError, StreamSettings, check_max_new_tokens

__all__ = ["Engine", "Stream", "Job", "ANSWER_BURST", "new_id"]

ANSWER_BURST = 8  # answer units in a row before one waiting backlog unit runs
_TICK_EPS = 1e-6
_STREAM_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Emit = Callable[[str, dict], None]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass(eq=False)
class Job:
    """One question on one stream. ``emit(kind, data)`` receives, from the worker thread:
    ``started`` (first token ready), ``delta`` (text), ``done`` (the result; always last)."""

    stream: Stream
    question: str
    max_new_tokens: int
    options: list[str] | None
    emit: Emit
    mark: int  # sequence number of the last frame pushed before the question
    id: str = field(default_factory=lambda: new_id("resp"))
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cancel_reason: str = "client_cancelled"
    gen: object = None
    tokens: list = field(default_factory=list)
    sent: str = ""
    first_token_at: float | None = None
    started: dict | None = None
    finished: bool = False


@dataclass(eq=False)
class Stream:
    """A stream's queue, counters and session (the session is touched by the worker only)."""

    id: str
    settings: StreamSettings
    kind: str = "push"  # or "pull"
    listener: Emit | None = None
    created: float = field(default_factory=time.monotonic)
    session: object = None
    rebuild: bool = True
    queue: deque = field(default_factory=deque)  # (seq, image, time)
    jobs: deque = field(default_factory=deque)
    active: Job | None = None
    seq: int = 0  # frames queued so far (the last one's sequence number)
    session_frames: int = 0  # frames given to the current session
    last_time: float | None = None
    frame_hw: tuple | None = None
    tick_origin: float | None = None
    next_tick: int = 0
    bucket: float = -1.0
    bucket_at: float = 0.0
    last_active: float = field(default_factory=time.monotonic)
    closed: str | None = None
    counts: dict = field(default_factory=lambda: dict(received=0, queued=0, ingested=0, skipped=0, dropped=0,
                                                      rejected=0))
    answers: dict = field(default_factory=dict)
    session_stats: dict = field(default_factory=dict)
    last_error: dict | None = None
    source: dict | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    watches: dict = field(default_factory=dict)  # watch id -> its spec (question, yes_no, options, min_interval)
    registered: dict = field(default_factory=dict)  # watch id -> the session's Watch (worker only)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def stream_time(self, timestamp) -> float:
        """``timestamp`` (seconds, None: now since the stream started) checked as a float."""
        if timestamp is None:
            return time.monotonic() - self.created
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp) \
                or timestamp < 0:
            raise ServeError(f"timestamp: expected seconds >= 0, got {timestamp!r}", param="timestamp")
        return float(timestamp)


class Metrics:
    """Server-wide counters (totals include closed streams) and latency histograms."""

    def __init__(self):
        self.counters = dict(frames_received=0, frames_ingested=0, frames_dropped=0, frames_skipped=0,
                             frames_rejected=0, visual_tokens_kept=0, visual_tokens_seen=0, sessions_opened=0)
        self.closed: dict[str, int] = {}
        self.answers: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.hist = {name: [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
                     for name in ("answer_first_token_seconds", "answer_seconds")}

    def observe(self, name: str, value: float) -> None:
        h = self.hist[name]
        for i, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                h[i] += 1
        h[len(LATENCY_BUCKETS)] += 1  # count (+Inf)
        h[-1] += value


class Engine:
    """Streams and the worker thread that serves them (see the module docstring).

    ``model``: a loaded adapter; ``defaults``: the settings of a new stream; ``size``: frames
    are resized to it when decoded (an int: the longer side; (W, H); None: as sent).
    """

    def __init__(self, model, defaults: StreamSettings | None = None, limits: Limits | None = None,
                 model_name: str = "", size=None):
        self.model = model
        self.model_name = model_name
        self.defaults = defaults or StreamSettings()
        self.limits = limits or Limits()
        self.size = size
        self.fpi = int(getattr(model, "frames_per_item", 1))
        self.metrics = Metrics()
        self.started_at = time.time()
        self._cond = threading.Condition()
        self._streams: dict[str, Stream] = {}
        self._closing: list[Stream] = []
        self._last = {"answer": None, "backlog": None}
        self._streak = 0
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="streampress-scheduler", daemon=True)
        self._pullers: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if not self._worker.is_alive():
            self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (open answers are cancelled, every stream closed)."""
        with self._cond:
            for s in list(self._streams.values()):
                self._close_locked(s, "server_shutdown")
            self._stopping = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)
        for s in self._closing:
            self._finalize(s)
        self._closing.clear()
        for t in self._pullers:
            t.join(2.0)

    @property
    def running(self) -> bool:
        return self._worker.is_alive() and not self._stopping

    # ------------------------------------------------------------------ streams
    def create_stream(self, settings: StreamSettings | None = None, listener: Emit | None = None,
                      kind: str = "push", stream_id: str | None = None) -> Stream:
        """A new stream (``stream_id``: chosen by the client, 1-64 letters, digits, ``._-``;
        default: a random ``sess_...``)."""
        if stream_id is not None and (not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id)):
            raise ServeError(f"stream_id: expected 1 to 64 letters, digits, '.', '_' or '-', got {stream_id!r}",
                             param="stream_id")
        with self._cond:
            if stream_id is not None and (stream_id in self._streams
                                          or any(c.id == stream_id for c in self._closing)):
                raise ServeError(f"a stream {stream_id!r} exists already", code="stream_exists", status=409,
                                 param="stream_id")
            if self._stopping:
                raise ServeError("the server is shutting down", code="shutting_down", status=503,
                                 type="server_error")
            if len(self._streams) >= self.limits.max_sessions:
                raise ServeError(f"the server is at its limit of {self.limits.max_sessions} sessions",
                                 code="too_many_sessions", status=503, type="server_error")
            s = Stream(stream_id or new_id("sess"), settings or self.defaults, kind=kind, listener=listener)
            self._streams[s.id] = s
            self.metrics.counters["sessions_opened"] += 1
            self._cond.notify_all()
            return s

    def get(self, stream_id: str) -> Stream:
        with self._cond:
            s = self._streams.get(stream_id)
        if s is None:
            raise ServeError(f"no stream {stream_id!r} (closed, expired or never created)", code="not_found",
                             status=404, param="stream_id")
        return s

    def streams(self) -> list[Stream]:
        with self._cond:
            return list(self._streams.values())

    def count(self, include_closing: bool = True) -> int:
        with self._cond:
            return len(self._streams) + (len(self._closing) if include_closing else 0)

    def update(self, s: Stream, patch) -> StreamSettings:
        """Apply a settings ``patch``; a change of method, budget, memory or cacher starts
        the stream over (frames waiting are dropped), a change of fps applies from now."""
        new = s.settings.updated(patch, self.limits)
        with self._cond:
            self._check_open(s)
            if not new.defines_same_stream(s.settings):
                s.rebuild = True
                self._drop_queue_locked(s)
            if new.fps != s.settings.fps and s.last_time is not None:
                s.tick_origin, s.next_tick = s.last_time, 1
            s.settings = new
            s.touch()
            self._cond.notify_all()
        return new

    def close_stream(self, s: Stream, reason: str = "closed") -> None:
        with self._cond:
            self._close_locked(s, reason)

    def _close_locked(self, s: Stream, reason: str) -> None:
        if s.closed is not None:
            return
        s.closed = reason
        s.stop.set()
        self._streams.pop(s.id, None)
        self._closing.append(s)
        self.metrics.closed[reason] = self.metrics.closed.get(reason, 0) + 1
        self._cond.notify_all()

    def _check_open(self, s: Stream) -> None:
        if s.closed is not None:
            raise ServeError(f"the stream is closed ({s.closed})", code="session_closed", status=410)

    # ------------------------------------------------------------------ frames
    def admit(self, s: Stream, timestamp=None, rate_limited: bool = True) -> tuple[float, bool]:
        """Before decoding a frame: its stream time and whether it is kept at the stream's
        fps (False: skipped and counted). Raises ServeError for a closed stream, a push rate
        over the limit or a timestamp before the last frame's."""
        with self._cond:
            self._check_open(s)
            now = time.monotonic()
            if rate_limited:
                rate = self.limits.max_push_rate
                s.bucket = rate if s.bucket < 0 else min(rate, s.bucket + (now - s.bucket_at) * rate)
                s.bucket_at = now
                if s.bucket < 1:
                    self._reject_locked(s, "rate_limited")
                    raise ServeError(f"more than {rate:g} frames per second on this stream", code="rate_limited",
                                     status=429)
                s.bucket -= 1
            t = s.stream_time(timestamp)
            s.counts["received"] += 1
            self.metrics.counters["frames_received"] += 1
            s.touch()
            return t, self._due_locked(s, t)

    def _due_locked(self, s: Stream, t: float) -> bool:
        """Whether a frame at stream time ``t`` falls on the stream's next fps tick (a frame
        off the grid is counted as skipped); a time before the last frame is refused."""
        if s.last_time is not None and t < s.last_time:
            self._reject_locked(s, "timestamp_backwards")
            raise ServeError(f"timestamp: {t:.3f} s is before the stream's last frame at {s.last_time:.3f} s",
                             param="timestamp", code="timestamp_backwards")
        if not self._on_tick(s, t):
            s.counts["skipped"] += 1
            self.metrics.counters["frames_skipped"] += 1
            return False
        return True

    def reject(self, s: Stream, code: str) -> None:
        """Count a frame refused after :meth:`admit` (a bad image)."""
        with self._cond:
            self._reject_locked(s, code)

    def _reject_locked(self, s: Stream, code: str) -> None:
        s.counts["rejected"] += 1
        self.metrics.counters["frames_rejected"] += 1
        self.metrics.errors[code] = self.metrics.errors.get(code, 0) + 1

    def _on_tick(self, s: Stream, t: float, commit: bool = False) -> bool:
        if s.tick_origin is None:
            if commit:
                s.tick_origin, s.next_tick = t, 1
            return True
        position = (t - s.tick_origin) * s.settings.fps
        if position + _TICK_EPS < s.next_tick:
            return False
        if commit:
            s.next_tick = math.floor(position + _TICK_EPS) + 1
        return True

    def push(self, s: Stream, image: np.ndarray, t: float, block: bool = False) -> str:
        """Queue a decoded frame ``uint8 [H, W, 3]`` at stream time ``t`` (from :meth:`admit`);
        returns ``queued`` or ``skipped``. At a full queue the oldest waiting frame is dropped
        (``block``: wait for room instead, for sources the server reads itself)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ServeError("frame: expected uint8 RGB pixels [H, W, 3]", param="image", code="invalid_image")
        hw = image.shape[:2]
        with self._cond:
            self._check_open(s)
            if s.frame_hw is not None and hw != s.frame_hw:
                self._reject_locked(s, "frame_size_changed")
                raise ServeError(f"image: the stream's frames are {s.frame_hw[1]}x{s.frame_hw[0]}, got "
                                 f"{hw[1]}x{hw[0]} (start a new stream, or change the method with "
                                 f"session.update, to change the size)", param="image", code="frame_size_changed")
            if not self._due_locked(s, t):
                return "skipped"
            while block and len(s.queue) >= self.limits.queue_frames and s.closed is None and not self._stopping:
                self._cond.wait(0.5)
            self._check_open(s)
            self._on_tick(s, t, commit=True)
            if len(s.queue) >= self.limits.queue_frames:
                s.queue.popleft()
                s.counts["dropped"] += 1
                self.metrics.counters["frames_dropped"] += 1
            s.seq += 1
            s.queue.append((s.seq, image, t))
            s.counts["queued"] += 1
            s.frame_hw = hw
            s.last_time = t
            s.touch()
            self._cond.notify_all()
            return "queued"

    def _drop_queue_locked(self, s: Stream) -> None:
        n = len(s.queue)
        s.queue.clear()
        s.counts["dropped"] += n
        self.metrics.counters["frames_dropped"] += n

    # ------------------------------------------------------------------ questions
    def ask(self, s: Stream, question: str, emit: Emit, max_new_tokens: int | None = None,
            options: list[str] | None = None) -> Job:
        """Queue a question over every frame pushed so far; events go to ``emit`` (from
        the worker thread: it must not block)."""
        if not isinstance(question, str) or not question.strip():
            raise ServeError("question: expected a non-empty string", param="question", code="empty_question")
        if len(question) > self.limits.max_question_chars:
            raise ServeError(f"question: {len(question)} characters, over the limit of "
                             f"{self.limits.max_question_chars}", param="question", code="question_too_long")
        if not _options_ok(options):
            raise ServeError("options: expected a list of 2 to 26 non-empty strings", param="options")

        n = s.settings.max_new_tokens if max_new_tokens is None else check_max_new_tokens(max_new_tokens, self.limits)
        with self._cond:
            self._check_open(s)
            if self._stopping:
                raise ServeError("the server is shutting down", code="shutting_down", status=503,
                                 type="server_error")
            job = Job(s, question, n, options, emit, s.seq)
            s.jobs.append(job)
            s.touch()
            self._cond.notify_all()
            return job

    def cancel(self, job: Job, reason: str = "client_cancelled") -> None:
        with self._cond:
            if not job.finished and not job.cancelled:
                job.cancelled = True
                job.cancel_reason = reason
                self._cond.notify_all()

    # ------------------------------------------------------------------ statistics
    def stream_stats(self, s: Stream) -> dict:
        with self._cond:
            now = time.monotonic()
            return {"id": s.id, "object": "streampress.stream", "kind": s.kind, "settings": s.settings.public(),
                    "age_seconds": now - s.created, "idle_seconds": now - s.last_active,
                    "frames": {**s.counts, "waiting": len(s.queue)},
                    "answers": dict(s.answers), "answering": s.active is not None, "questions_waiting": len(s.jobs),
                    "session": dict(s.session_stats), "source": None if s.source is None else dict(s.source),
                    "last_error": s.last_error, "closed": s.closed}

    def health(self) -> dict:
        return {"status": "ok" if self.running else "stopping", "model": self.model_name,
                "sessions": self.count(include_closing=False), "max_sessions": self.limits.max_sessions,
                "uptime_seconds": time.time() - self.started_at}

    def metrics_text(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        with self._cond:
            m = self.metrics
            queue = sum(len(s.queue) for s in self._streams.values())
            waiting = sum(len(s.jobs) + (s.active is not None) for s in self._streams.values())
            sessions = len(self._streams)
            counters = dict(m.counters)
            closed, answers, errors = dict(m.closed), dict(m.answers), dict(m.errors)
            hist = {k: list(v) for k, v in m.hist.items()}
        lines: list[str] = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP streampress_{name} {help_text}")
            lines.append(f"# TYPE streampress_{name} {kind}")
            for labels, value in samples:
                lines.append(f"streampress_{name}{labels} {value:g}" if isinstance(value, float)
                             else f"streampress_{name}{labels} {value}")

        help_texts = {
            "frames_received": "frames sent to the server", "frames_ingested": "frames given to the model",
            "frames_dropped": "frames dropped because ingestion fell behind (oldest waiting frame first)",
            "frames_skipped": "frames skipped to keep the stream's fps",
            "frames_rejected": "frames refused (bad image, too large, rate limit, time going backwards)",
            "visual_tokens_kept": "visual tokens kept after pruning", "visual_tokens_seen": "visual tokens encoded",
            "sessions_opened": "streams opened"}
        for key, text in help_texts.items():
            metric(f"{key}_total", "counter", text, [("", counters[key])])
        metric("sessions", "gauge", "streams open", [("", sessions)])
        metric("queue_depth", "gauge", "frames waiting for ingestion, all streams", [("", queue)])
        metric("questions_waiting", "gauge", "questions waiting or being answered", [("", waiting)])
        metric("sessions_closed_total", "counter", "streams closed, by reason",
               [(f'{{reason="{k}"}}', v) for k, v in sorted(closed.items())])
        metric("answers_total", "counter", "answers, by status",
               [(f'{{status="{k}"}}', v) for k, v in sorted(answers.items())])
        metric("errors_total", "counter", "refused requests and frames, by code",
               [(f'{{code="{k}"}}', v) for k, v in sorted(errors.items())])
        for name, text in (("answer_first_token_seconds", "question received to first answer token"),
                           ("answer_seconds", "question received to last answer token")):
            h = hist[name]
            samples = [(f'_bucket{{le="{b:g}"}}', h[i]) for i, b in enumerate(LATENCY_BUCKETS)]
            samples += [('_bucket{le="+Inf"}', h[len(LATENCY_BUCKETS)]), ("_sum", float(h[-1])),
                        ("_count", h[len(LATENCY_BUCKETS)])]
            metric(name, "histogram", text, samples)
        return "\n".join(lines) + "\n"

    def count_error(self, code: str) -> None:
        with self._cond:
            self.metrics.errors[code] = self.metrics.errors.get(code, 0) + 1

    # ------------------------------------------------------------------ pull mode
    def pull(self, s: Stream, source, realtime: bool = True) -> None:
        """Read ``source`` (a file, folder of images, stream URL or camera, through
        :func:`streampress.video.open_video`) into ``s`` on a thread of its own: played at
        its own rate (``realtime``) or as fast as ingestion takes it."""
        s.source = {"source": str(source), "realtime": realtime, "state": "opening", "frames": 0, "error": None}
        thread = threading.Thread(target=self._pull, args=(s, source, realtime), daemon=True,
                                  name=f"streampress-pull-{s.id}")
        self._pullers = [t for t in self._pullers if t.is_alive()] + [thread]
        thread.start()

    def _pull(self, s: Stream, source, realtime: bool) -> None:
        from streampress.video import open_video

        video = None
        try:
            video = open_video(source, fps=s.settings.fps, size=self.size, timeout=10.0)
            s.source["state"] = "playing"
            start = time.monotonic()
            for frame in video:
                if s.stop.is_set():
                    break
                if realtime:
                    wait = start + frame.timestamp - time.monotonic()
                    if wait > 0 and s.stop.wait(wait):
                        break
                t, keep = self.admit(s, frame.timestamp, rate_limited=False)
                if keep:
                    self.push(s, np.ascontiguousarray(frame.image, dtype=np.uint8), t, block=not realtime)
                s.source["frames"] += 1
            s.source["state"] = "stopped" if s.stop.is_set() else "finished"
        except ServeError as exc:
            s.source.update(state="stopped" if exc.code == "session_closed" else "failed", error=exc.message)
        except Exception as exc:  # a source that fails to open or breaks off: the stream stays
            s.source.update(state="failed", error=" ".join(str(exc).split()) or type(exc).__name__)
        finally:
            if video is not None:
                video.close()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        next_check = 0.0
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                if now >= next_check:
                    self._expire_locked(now)
                    next_check = now + min(1.0, self.limits.idle_timeout / 4)
                unit = self._next_unit()
                if unit is None:
                    self._cond.wait(max(0.01, next_check - time.monotonic()))
                    continue
            try:
                unit()
            except Exception as exc:  # a bug in a unit must not stop the server
                self._note_error(None, "internal_error", f"{type(exc).__name__}: {exc}")

    def _expire_locked(self, now: float) -> None:
        for s in list(self._streams.values()):
            if s.active is None and not s.jobs and now - s.last_active > self.limits.idle_timeout:
                self._close_locked(s, "idle")

    def _next_unit(self):
        if self._closing:
            s = self._closing.pop(0)
            return lambda: self._finalize(s)
        for s in self._streams.values():
            if s.rebuild and s.active is None:
                s.rebuild = False
                return lambda: self._build(s)
        answer = self._round_robin("answer", lambda s: s.session is not None and (s.active is not None or s.jobs))
        backlog = self._round_robin("backlog", lambda s: s.session is not None and s.active is None
                                    and len(s.queue) >= self._frames_to_item(s))
        if answer is not None and (backlog is None or self._streak < ANSWER_BURST):
            self._streak += 1
            self._last["answer"] = answer.id
            return self._answer_unit(answer)
        if backlog is not None:
            self._streak = 0
            self._last["backlog"] = backlog.id
            return self._ingest_unit(backlog, self._frames_to_item(backlog))
        return None

    def _round_robin(self, kind: str, eligible) -> Stream | None:
        ids = list(self._streams)
        last = self._last[kind]
        start = ids.index(last) + 1 if last in self._streams else 0
        for sid in itertools.chain(ids[start:], ids[:start]):
            if eligible(self._streams[sid]):
                return self._streams[sid]
        return None

    def _frames_to_item(self, s: Stream) -> int:
        return self.fpi - s.session_frames % self.fpi

    def _answer_unit(self, s: Stream):
        if s.active is not None:
            job = s.active
            return lambda: self._step(s, job)
        job = s.jobs[0]
        if job.cancelled:
            s.jobs.popleft()
            return lambda: self._finish(s, job, None, "cancelled", job.cancel_reason)
        before = sum(1 for seq, _, _ in s.queue if seq <= job.mark)
        if before:  # the frames sent before the question go in first
            return self._ingest_unit(s, min(before, self._frames_to_item(s)))
        s.jobs.popleft()
        s.active = job
        job.gen = _answer_steps(s.session, job, self._on_started)
        return lambda: self._step(s, job)

    def _ingest_unit(self, s: Stream, n: int):
        frames = [s.queue.popleft() for _ in range(n)]
        self._cond.notify_all()  # a blocked pull reader may go on

        def ingest():
            session = s.session
            self._sync_watches(s)
            # the session's statistics as of its last build, ingest or answer (only this
            # worker thread changes the session): no second stats() call per item
            before = s.session_stats
            try:
                session.add_frames(np.stack([f[1] for f in frames]), [f[2] for f in frames])
            except Exception as exc:  # the session undid the call; the stream goes on
                self._note_error(s, "ingest_failed", f"frames at {frames[0][2]:.3f} s could not be ingested: "
                                                     f"{' '.join(str(exc).split())}")
                return
            stats = session.stats()
            with self._cond:
                s.session_frames += n
                s.counts["ingested"] += n
                s.session_stats = stats
                c = self.metrics.counters
                c["frames_ingested"] += n
                for key in ("visual_tokens_kept", "visual_tokens_seen"):
                    c[key] += stats.get(key, 0) - before.get(key, 0)

        return ingest

    def _build(self, s: Stream) -> None:
        from streampress import StreamingSession

        old, s.session = s.session, None
        del old
        try:
            settings = s.settings
            session = StreamingSession(self.model, pruner=settings.make_pruner(), cacher=settings.make_cacher(),
                                       memory=settings.make_memory())
        except Exception as exc:
            self._note_error(s, "session_failed", f"the session could not be built: {exc}")
            self.close_stream(s, "failed")
            return
        with self._cond:
            if s.rebuild:  # settings changed again meanwhile: build again
                return
            s.session = session
            s.session_frames = 0
            s.session_stats = session.stats()
            s.registered = {}  # the new session gets the stream's watches at its next frames

    def _step(self, s: Stream, job: Job) -> None:
        if job.cancelled:
            job.gen.close()  # leaves the answer context: the session is as before the question
            self._finish(s, job, None, "cancelled", job.cancel_reason)
            return
        try:
            token = next(job.gen)
        except StopIteration as stop:
            answer = stop.value
            reason = "max_output_tokens" if len(answer.token_ids) >= job.max_new_tokens else None
            self._finish(s, job, answer, "incomplete" if reason else "completed", reason)
            return
        except Exception as exc:
            self._finish(s, job, None, "failed", None, error={"type": "server_error", "code": "answer_failed",
                                                              "message": " ".join(str(exc).split())})
            return
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
        job.tokens.append(token)
        text = s.session.model.detokenize(job.tokens)
        safe = text.rstrip("\ufffd")  # hold back a character still incomplete
        if safe.startswith(job.sent) and len(safe) > len(job.sent):
            delta, job.sent = safe[len(job.sent):], safe
            _call(job.emit, "delta", {"text": delta})

    def _on_started(self, job: Job, ttft: float, seen: tuple) -> None:
        job.started = {"time_to_first_token": ttft, "frames": seen[0], "items": seen[1], "visual_tokens": seen[2]}
        _call(job.emit, "started", dict(job.started))

    def _finish(self, s: Stream, job: Job, answer, status: str, reason: str | None, error: dict | None = None
                ) -> None:
        now = time.monotonic()
        stats = s.session.stats() if s.session is not None and status != "cancelled" else dict(s.session_stats)
        with self._cond:
            if s.active is job:
                s.active = None
            job.finished = True
            s.answers[status] = s.answers.get(status, 0) + 1
            self.metrics.answers[status] = self.metrics.answers.get(status, 0) + 1
            if job.first_token_at is not None:
                self.metrics.observe("answer_first_token_seconds", job.first_token_at - job.created)
            if status in ("completed", "incomplete"):
                self.metrics.observe("answer_seconds", now - job.created)
            s.session_stats = stats
            s.touch()
            self._cond.notify_all()
        text = answer.text if answer is not None else job.sent
        if answer is not None and text.startswith(job.sent) and len(text) > len(job.sent):
            _call(job.emit, "delta", {"text": text[len(job.sent):]})
            job.sent = text
        started = job.started or {}
        result = {
            "id": job.id, "status": status, "reason": reason, "error": error, "question": job.question,
            "text": text, "token_ids": list(answer.token_ids) if answer is not None else list(job.tokens),
            "choice": getattr(answer, "choice", None),
            "option_logits": dict(getattr(answer, "option_logits", {}) or {}),
            "streampress": {
                "time_to_first_token": started.get("time_to_first_token"),
                "first_token_latency": None if job.first_token_at is None else job.first_token_at - job.created,
                "seconds": now - job.created,
                "answer_seconds": getattr(answer, "seconds", None),
                "frames": started.get("frames"), "items": started.get("items"),
                "visual_tokens": started.get("visual_tokens"),
                "visual_tokens_seen": stats.get("visual_tokens_seen"),
                "visual_tokens_kept": stats.get("visual_tokens_kept"),
                "kept_fraction": stats.get("kept_fraction"),
                "kv_cache_tokens": stats.get("kv_cache_tokens"),
                "stream_time": s.last_time,
                "frames_dropped": s.counts["dropped"], "frames_skipped": s.counts["skipped"],
                "frames_waiting": len(s.queue),
            },
        }
        _call(job.emit, "done", result)

    def _finalize(self, s: Stream) -> None:
        """A closed stream: its open answer is closed (the session rolled back), waiting
        questions cancelled, the session dropped."""
        if s.active is not None:
            job = s.active
            if job.gen is not None:
                try:
                    job.gen.close()
                except Exception:
                    pass
            self._finish(s, job, None, "cancelled", "session_closed")
        while s.jobs:
            self._finish(s, s.jobs.popleft(), None, "cancelled", "session_closed")
        with self._cond:
            s.queue.clear()
            s.session = None
            s.session_stats = {}
            self._cond.notify_all()
        if s.listener is not None:
            _call(s.listener, "closed", {"reason": s.closed})

    # ---- proactive answers -------------------------------------------------------------
    def add_watch(self, s: Stream, spec: Any) -> dict:
        """Register a standing question on ``s`` (see :mod:`streampress.watch`); its answers
        reach the stream's listener as ``watch`` events. Returns the watch with its id."""
        if not isinstance(spec, dict):
            raise ServeError("watch: expected an object with a question", param="watch")
        unknown = sorted(set(spec) - {"question", "yes_no", "options", "min_interval", "max_new_tokens"})
        if unknown:
            raise ServeError(f"watch.{unknown[0]}: unknown field (question, yes_no, options, min_interval, "
                             "max_new_tokens)", param=f"watch.{unknown[0]}")
        question = spec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ServeError("watch.question: expected a non-empty string", param="watch.question")
        if len(question) > self.limits.max_question_chars:
            raise ServeError(f"watch.question: over the limit of {self.limits.max_question_chars} characters",
                             param="watch.question", code="question_too_long")
        if not isinstance(spec.get("yes_no", False), bool):
            raise ServeError("watch.yes_no: expected true or false", param="watch.yes_no")
        options = spec.get("options")
        if not _options_ok(options):
            raise ServeError("watch.options: expected 2 to 26 non-empty strings", param="watch.options")
        if options is not None and spec.get("yes_no"):
            raise ServeError("watch: options and yes_no exclude each other", param="watch.options")
        interval = spec.get("min_interval", 0.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
                0 <= interval < math.inf):
            raise ServeError("watch.min_interval: expected seconds >= 0", param="watch.min_interval")
        tokens = check_max_new_tokens(spec.get("max_new_tokens", s.settings.max_new_tokens), self.limits,
                                      "watch.max_new_tokens")
        watch = {"id": new_id("watch"), "question": question, "yes_no": bool(spec.get("yes_no", False)),
                 "options": options, "min_interval": float(interval), "max_new_tokens": tokens}
        with self._cond:
            self._check_open(s)
            if len(s.watches) >= self.limits.max_watches:
                raise ServeError(f"a stream has at most {self.limits.max_watches} watches", code="too_many_watches",
                                 param="watch")
            s.watches[watch["id"]] = watch
        return watch

    def remove_watch(self, s: Stream, watch_id: Any) -> None:
        with self._cond:
            if watch_id not in s.watches:
                raise ServeError(f"no watch {watch_id!r} on this stream", code="watch_not_found", status=404,
                                 param="watch_id")
            del s.watches[watch_id]

    def _sync_watches(self, s: Stream) -> None:
        """(Worker) the session's watches follow the stream's: new ones registered, removed ones cancelled."""
        session = s.session
        if session is None:
            return
        with self._cond:
            wanted = dict(s.watches)
        for wid in [w for w in s.registered if w not in wanted]:
            s.registered.pop(wid).cancel()
        for wid, spec in wanted.items():
            if wid not in s.registered:
                s.registered[wid] = session.watch(
                    spec["question"], options=spec["options"], yes_no=spec["yes_no"],
                    min_interval=spec["min_interval"], max_new_tokens=spec["max_new_tokens"],
                    on_answer=lambda event, wid=wid: self._on_watch(s, wid, event))

    def _on_watch(self, s: Stream, wid: str, event) -> None:
        data = {"watch_id": wid, **event.as_dict()}
        with self._cond:
            self.metrics.counters["watch_answers"] = self.metrics.counters.get("watch_answers", 0) + 1
            spec = s.watches.get(wid)
            if spec is not None:
                spec["last"] = data
        if s.listener is not None:
            _call(s.listener, "watch", data)

    def _note_error(self, s: Stream | None, code: str, message: str) -> None:
        error = {"type": "server_error", "code": code, "message": message}
        with self._cond:
            self.metrics.errors[code] = self.metrics.errors.get(code, 0) + 1
            if s is not None:
                s.last_error = error
        if s is not None and s.listener is not None:
            _call(s.listener, "error", error)


def _options_ok(options) -> bool:
    """No options, or a list of 2 to 26 non-empty strings (a question's or a watch's)."""
    return options is None or (isinstance(options, list) and 2 <= len(options) <= 26
                               and all(isinstance(o, str) and o.strip() for o in options))


def _call(emit: Emit, kind: str, data: dict) -> None:
    try:
        emit(kind, data)
    except Exception:  # a listener that went away (closed loop) must not stop the worker
        pass


def _answer_steps(session, job: Job, on_started):
    """The answer as a generator of token ids, returning the :class:`~streampress.Answer`
    (:meth:`StreamingSession.ask_stream` one token per step, so that answers of several
    streams interleave and a cancelled answer stops between tokens: closing the generator
    leaves the session exactly as before the question). ``on_started(job, ttft, seen)``
    runs once the question is prefilled."""
    stream = session.ask_stream(job.question, max_new_tokens=job.max_new_tokens, options=job.options)
    reported = False
    try:
        for token in stream:
            if not reported:
                reported = True
                on_started(job, stream.started[0], stream.started[1:])
            yield token
    finally:
        stream.close()
    if not reported:
        on_started(job, stream.started[0], stream.started[1:])
    return stream.answer
