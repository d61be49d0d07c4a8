"""StreamingSession: frames in, answers out, with pruned visual tokens at their original positions.

One session is one stream. Per :meth:`StreamingSession.add_frames` call:

1. frames are validated and grouped into items (``adapter.frames_per_item`` frames: a
   temporal patch for Qwen); an incomplete item waits for the next call for its partner
   frame (a question asked meanwhile still sees it: see below);
2. the adapter preprocesses and encodes the complete items (through the cacher when one
   is given) to grids ``[T, H', W', D]``;
3. the pruner, called once per chunk on all new grids, returns a keep mask ``[T, H', W']``;
4. the adapter lays the chunk out (wrapper text + visual tokens) with the positions of the
   UNPRUNED stream; the kept tokens (and all text) are prefilled into the KV cache with
   those positions, per-token extras (Qwen3-VL DeepStack) pruned with the same mask;
5. the memory policy records one block per item and may evict old ones (whole items, or,
   with :class:`streampress.BudgetMemory`, single tokens per layer and KV head); a store
   that placed a token at a new position (HERMES's summary token) sets
   ``position_floor`` and the stream's next position moves up to it; a store that
   re-indexed the cached positions (``BudgetMemory(reindex=...)``: left-compaction near
   the model's position limit) counts it in ``relocations`` and the stream continues
   right after ``position_top`` (:meth:`ModelAdapter.relocate`).

:meth:`StreamingSession.ask` runs the question at ``max(all positions) + 1`` and a greedy
loop with explicit positions, then removes the question and answer from the cache, so the
stream continues exactly as if never asked. A question sees every frame up to its time:
when an item is incomplete (Qwen: one frame of a temporal patch), the question runs on a
temporary item made as the Hugging Face Qwen processors pad an odd frame count (the last
frame repeated into a full temporal patch), encoded, pruned and prefilled like any item;
afterwards the cache, the pruner and cacher state, the positions and the statistics are
exactly as before the question, and the real item forms when the partner frame arrives.

Everything a stream remembers lives in the session (and its pruner / cacher state /
memory store), so sessions sharing one model never interact. Bad input raises before any
state changes; a call that fails at any later stage (encoder, cacher, pruner, prefill,
memory eviction) is undone whole: cache, blocks, pruner and cacher state, positions,
pending frames and statistics return to what they were, so a retry of the same frames
gives exactly what a run that never failed gives. (A pruner or cacher state is rolled
back through its ``snapshot()`` / ``restore()``; for a custom pruner without them the
session saves and restores its attributes, which is exact when the pruner replaces its
state attributes rather than editing them in place.)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .memory.base import Block, QuestionInput, resolve_memory
from .models.base import VISUAL, ModelAdapter, PositionState, TokenLayout, text_positions
from .protocols import EncoderReuse, MemoryPolicy, Pruner, StreamMemory
from .watch import TAU, Signal, Trigger, Watch, WatchEvent, change_signal, first_firing

__all__ = ["StreamingSession", "Answer", "AnswerStream"]

_SIGNALS_KEPT = 256  # change signals a stream remembers (the trigger's history reads the last few)

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Answer:
    """An answer. ``choice``: the option letter with the highest next-token logit after the
    prompt (multiple choice only; independent of the sampled text); ``option_logits``:
    letter -> logit; ``token_ids``: generated ids; times in seconds (``time_to_first_token``
    includes the temporary item of a pending frame). What the question saw: ``frames``
    (every frame added so far), ``items`` (items, a temporary one included) and
    ``visual_tokens`` (visual tokens kept in those items)."""

    text: str
    choice: str | None = None
    option_logits: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    time_to_first_token: float = 0.0
    seconds: float = 0.0
    frames: int = 0
    items: int = 0
    visual_tokens: int = 0

    def __str__(self) -> str:
        return self.text


def _frames_tensor(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames must not be empty")
        frames = [torch.as_tensor(np.asarray(f)) if not isinstance(f, torch.Tensor) else f for f in frames]
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) > 1:
            raise ValueError(f"frames in one call must all have the same shape [H, W, 3], got "
                             f"{', '.join(map(str, sorted(shapes)))}")
        frames = torch.stack(frames)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a uint8 numpy array or torch tensor [F, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        raise ValueError(f"frames must have shape [F, H, W, 3] (or [H, W, 3]), got {tuple(frames.shape)}")
    if frames.shape[-1] != 3:
        raise ValueError(f"frames must have 3 channels (RGB) in the last dimension, got shape {tuple(frames.shape)}")
    if min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    return frames


class StreamingSession:
    """A video stream watched by a model (see the module docstring).

    ``model``: an adapter from :func:`streampress.load_model` (or a name to load);
    ``pruner``: any callable ``grids [T, H, W, D] -> keep [T, H, W]`` with ``reset()``, or
    None to keep everything; ``cacher``: an STC cacher (``new_state()``), or None;
    ``memory``: ``"full"``, :class:`streampress.SlidingWindow` or another policy.
    (The contracts are the protocols of :mod:`streampress.protocols`.)
    """

    def __init__(self, model: ModelAdapter | str, pruner: Pruner | None = None, cacher: EncoderReuse | None = None,
                 memory: MemoryPolicy | str = "full"):
        if isinstance(model, str):
            from .models import load_model

            model = load_model(model)
        for attr in ("preprocess", "encode", "layout_items", "forward", "frames_per_item"):
            if not hasattr(model, attr):
                raise TypeError(f"model must be a model adapter (streampress.load_model), got {type(model).__name__}")
        if pruner is not None and not callable(pruner):
            raise TypeError(f"pruner must be callable (streampress.create_pruner), got {type(pruner).__name__}")
        if cacher is not None and not callable(getattr(cacher, "new_state", None)):
            raise TypeError(f"cacher must be an STC cacher (streampress.StcCacher) or None, got {cacher!r}")
        self.model = model
        self.pruner = pruner
        self.cacher = cacher
        self._cacher_state = cacher.new_state() if cacher is not None else None
        self._watches: list[Watch] = []
        self._policy: MemoryPolicy = resolve_memory(memory)
        self.reset()

    # ---- lifecycle ----------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new stream: empty cache, positions, pruner and cacher state, statistics."""
        if self.pruner is not None and hasattr(self.pruner, "reset"):
            self.pruner.reset()
        if self._cacher_state is not None and hasattr(self._cacher_state, "reset"):
            self._cacher_state.reset()
        self._memory: StreamMemory = self._policy.open(self.model)
        self._pending = None  # frames of an incomplete item, with their times
        self._pending_times = torch.zeros(0, dtype=torch.float64)
        self._last_time: float | None = None
        self._frame_hw: tuple[int, int] | None = None
        self._grid_hw: tuple[int, int] | None = None
        self._warned_positions = False
        self._relocations = 0
        self._counts = dict(frames=0, items=0, visual_tokens_seen=0, visual_tokens_kept=0, questions=0,
                            encode_seconds=0.0, prune_seconds=0.0, prefill_seconds=0.0, answer_seconds=0.0,
                            watch_probes=0)
        # Change signal (streampress.watch): the last item's grid and (item time, signal) pairs.
        self._last_grids: torch.Tensor | None = None  # the last two items' grids
        self._signals: tuple[tuple[float, Signal], ...] = ()
        self._events: list[WatchEvent] = []
        for w in getattr(self, "_watches", ()):
            w.last_text = w.last_probe = None
        layout, state = self.model.begin_stream(PositionState())
        self._prefill(layout)
        self._state = state

    # ---- frames -----------------------------------------------------------------------
    def add_frames(self, frames, timestamps) -> None:
        """Add frames ``[F, H, W, 3]`` uint8 (numpy or torch; one frame ``[H, W, 3]`` also
        works) taken at ``timestamps`` (F seconds, non-decreasing, not before earlier frames)."""
        frames = _frames_tensor(frames)
        times = self._check_times(timestamps, frames.shape[0])
        hw = (int(frames.shape[1]), int(frames.shape[2]))
        if self._frame_hw is not None and hw != self._frame_hw:
            raise ValueError(f"frames must keep the stream's size {self._frame_hw[0]}x{self._frame_hw[1]}, "
                             f"got {hw[0]}x{hw[1]} (call reset() to start a stream of another size)")
        items = self._counts["items"]
        with self._undo_on_failure():
            self._add_frames(frames, times, hw)
        if self._watches and self._counts["items"] > items:
            self._probe_watches(self._counts["items"] - items)

    def _add_frames(self, frames: torch.Tensor, times: torch.Tensor, hw: tuple[int, int]) -> None:
        if self._pending is not None:
            frames = torch.cat([self._pending, frames.to(self._pending.device)])
        times = torch.cat([self._pending_times, times])
        fpi = self.model.frames_per_item
        n = frames.shape[0] // fpi
        if n:
            self._add_items(frames[:n * fpi], times[:n * fpi].view(n, fpi))
        rest = frames.shape[0] - n * fpi
        self._pending = frames[n * fpi:].clone() if rest else None
        self._pending_times = times[n * fpi:].clone()
        self._frame_hw = hw
        self._last_time = float(times[-1])
        self._counts["frames"] = self._counts["items"] * fpi + rest
        self._memory.after_add(self._last_time - (self._state.start_time or 0.0))
        moved = getattr(self._memory, "relocations", 0)  # a store that re-indexed positions (BudgetMemory)
        if moved != self._relocations:
            self._state = self.model.relocate(self._state, self._memory.position_top)
            self._relocations = moved
        floor = getattr(self._memory, "position_floor", None)  # a token a store placed (HERMES summary)
        if floor is not None and floor > self._state.max_position + 1:
            self._state = self._state.advanced(max_position=floor - 1,
                                               next_position=max(self._state.next_position, floor))

    # ---- undo ---------------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        """Everything the stream remembers, cheaply (nothing is copied but small counters:
        the stores and states are replaced, never edited in place)."""
        attrs = {name: getattr(self, name) for name in self._STREAM_ATTRS}
        attrs["_counts"] = dict(self._counts)
        pruner = _snapshot_of(self.pruner)
        cacher = self._cacher_state.snapshot() if hasattr(self._cacher_state, "snapshot") else None
        return attrs, pruner, cacher, self._memory.mark()

    def _restore(self, snapshot: tuple) -> None:
        attrs, pruner, cacher, memory = snapshot
        self._memory.rollback(memory)
        if pruner is not None:
            _restore_to(self.pruner, pruner)
        if cacher is not None:
            self._cacher_state.restore(cacher)
        for name, value in attrs.items():
            setattr(self, name, value)

    _STREAM_ATTRS = ("_pending", "_pending_times", "_last_time", "_frame_hw", "_grid_hw", "_state", "_counts",
                     "_last_grids", "_signals", "_relocations")

    @contextmanager
    def _undo_on_failure(self):
        snapshot = self._snapshot()
        try:
            yield
        except BaseException:
            self._restore(snapshot)
            raise

    @contextmanager
    def _pending_visible(self):
        """While a question runs: the incomplete trailing item as a temporary item (its
        frames padded with the last one, as the HF Qwen processors pad an odd count),
        removed again afterwards with every trace of it."""
        if self._pending is None:
            yield
            return
        snapshot = self._snapshot()
        try:
            fpi = self.model.frames_per_item
            pad = fpi - self._pending.shape[0]
            frames = torch.cat([self._pending, self._pending[-1:].expand(pad, *self._pending.shape[1:])])
            times = torch.cat([self._pending_times, self._pending_times[-1:].expand(pad)])
            self._add_items(frames, times.view(1, fpi))
            yield
        finally:
            self._restore(snapshot)

    def _check_times(self, timestamps, count: int) -> torch.Tensor:
        if timestamps is None:
            raise ValueError("timestamps are required: one time in seconds per frame")
        try:
            times = torch.as_tensor(np.asarray(timestamps, dtype=np.float64)).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"timestamps must be a sequence of numbers (seconds), got {timestamps!r}") from exc
        if np.ndim(timestamps) > 1 or times.numel() != count:
            raise ValueError(f"timestamps must hold one time per frame: {count} frame(s), "
                             f"got {times.numel()} timestamp(s)")
        if not torch.isfinite(times).all():
            raise ValueError("timestamps must be finite numbers")
        if count > 1 and bool((times[1:] < times[:-1]).any()):
            raise ValueError("timestamps must not go backwards (non-decreasing seconds)")
        if self._last_time is not None and float(times[0]) < self._last_time:
            raise ValueError(f"timestamps must not go backwards: got {float(times[0]):.3f} s after a frame at "
                             f"{self._last_time:.3f} s")
        return times

    def _add_items(self, frames: torch.Tensor, times: torch.Tensor) -> None:
        model = self.model
        start_time = self._state.start_time if self._state.start_time is not None else float(times[0, 0])
        t0 = self._clock()
        batch = model.preprocess(frames)
        encoded = model.encode(batch, cacher_state=self._cacher_state, cacher=self.cacher)
        grids = encoded.grids
        t1 = self._clock()
        n, hh, ww, _ = grids.shape
        signals = change_signal(grids, self._last_grids, TAU)
        if self.pruner is not None:
            keep = self.pruner(grids)
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (n, hh, ww):
                raise ValueError(f"pruner must return a bool tensor of shape {(n, hh, ww)}, got "
                                 f"{getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}")
        else:
            keep = torch.ones(n, hh, ww, dtype=torch.bool)
        keep = keep.reshape(-1).cpu()
        t2 = self._clock()
        state = self._state.advanced(start_time=start_time)
        rel = times - start_time
        layout, new_state = model.layout_items(state, rel, (hh, ww))
        first_item = state.num_items
        if bool(((layout.item < first_item) | (layout.item >= first_item + n)).any()):
            raise ValueError("model adapter bug: layout_items must tag every token with its item index")
        run = layout.select((layout.kinds != VISUAL) | keep[layout.visual_index.clamp(min=0)])
        offset = self._memory.length()
        self._prefill(run, grids, encoded.extras)
        t3 = self._clock()
        # Commit: one block per item, in the order the chunk was laid out.
        lengths = torch.bincount(run.item - first_item, minlength=n).tolist()
        raster = torch.where(run.kinds == VISUAL, run.visual_index % (hh * ww), -1)  # grid coordinate, -1: text
        starts = rel[:, 0].tolist()
        blocks, at = [], 0
        for k, (length, t_start, t_end) in enumerate(zip(lengths, starts, rel[:, -1].tolist())):
            blocks.append(Block(first_item + k, t_start, t_end, offset + at, length,
                                run.positions[:, at:at + length], raster[at:at + length], (hh, ww)))
            at += length
        self._memory.add_blocks(blocks)
        self._state = new_state
        c = self._counts
        c["items"] += n
        c["visual_tokens_seen"] += n * hh * ww
        c["visual_tokens_kept"] += int(keep.sum())
        c["encode_seconds"] += t1 - t0
        c["prune_seconds"] += t2 - t1
        c["prefill_seconds"] += t3 - t2
        self._grid_hw = (hh, ww)
        tail = grids[-2:].detach()
        # a copy of the last two grids (not a view, which would keep the whole chunk alive)
        self._last_grids = (tail.clone() if self._last_grids is None or n >= 2
                            else torch.cat([self._last_grids[-1:], tail]))
        item_times = [t + start_time for t in starts]
        self._signals = (self._signals + tuple(zip(item_times, signals)))[-_SIGNALS_KEPT:]

    def _prefill(self, layout: TokenLayout, grids: torch.Tensor | None = None,
                 extras: dict | None = None) -> None:
        """Embed the tokens of ``layout`` (the kept ones; visual rows taken from ``grids
        [T, H', W', D]``, their ``extras`` pruned alike) and run them into the cache (undone
        on failure)."""
        model = self.model
        if not len(layout):  # everything pruned: nothing enters the cache
            return
        is_visual = layout.kinds == VISUAL
        device = model.device
        embeds = torch.empty(len(layout), model.hidden_size, dtype=model.dtype, device=device)
        text_at = (~is_visual).nonzero().squeeze(1)
        visual_at = is_visual.nonzero().squeeze(1)
        if text_at.numel():
            embeds[text_at.to(device)] = model.embed_text(layout.input_ids[text_at]).to(embeds.dtype)
        rows = layout.visual_index[visual_at]
        if grids is not None:
            rows = rows.to(grids.device)  # once: the extras live with the grids
        if visual_at.numel():
            embeds[visual_at.to(device)] = grids.flatten(0, 2)[rows].to(device, embeds.dtype)
        if extras:
            extras = {k: v.flatten(0, 2)[rows.to(v.device)] for k, v in extras.items()}
        length = self._memory.length()
        try:
            model.forward(embeds, layout.positions, self._memory.cache, visual_mask=is_visual,
                          extras=extras, logits="none")
        except BaseException:
            self._memory.truncate(length)
            raise

    # ---- questions --------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 32, options: Sequence[str] | None = None) -> Answer:
        """Answer ``question`` from everything seen so far, then forget the question.

        With ``options`` (2-26 strings) the prompt lists them as ``A. ...``, ``B. ...``
        (unless they already start with their letter) and asks for the letter;
        ``Answer.choice`` is the letter whose token has the highest logit.
        ``max_new_tokens`` may be 0 with options (choice only).
        """
        answer = self._answer(question, max_new_tokens, options)
        self._counts["questions"] += 1
        self._counts["answer_seconds"] += answer.seconds
        return answer

    def ask_stream(self, question: str, max_new_tokens: int = 32,
                   options: Sequence[str] | None = None) -> AnswerStream:
        """:meth:`ask`, one token at a time: iterate the returned :class:`AnswerStream` for
        the answer's token ids as they are generated; ``stream.started`` is set once the
        question is prefilled (time to first token and what the question saw) and
        ``stream.answer`` once it is exhausted. ``stream.close()`` stops early; either way
        the question leaves no trace. Arguments are checked at once."""
        stream = AnswerStream()
        stream._gen = self._answer_steps(*self._question_prompt(question, max_new_tokens, options),
                                         max_new_tokens, stream, count=True)
        return stream

    def _answer(self, question: str, max_new_tokens: int, options: Sequence[str] | None) -> Answer:
        stream = AnswerStream()
        stream._gen = self._answer_steps(*self._question_prompt(question, max_new_tokens, options),
                                         max_new_tokens, stream, count=False)
        for _ in stream:
            pass
        return stream.answer

    def _question_prompt(self, question: str, max_new_tokens: int,
                         options: Sequence[str] | None) -> tuple[str, list[str]]:
        """The question as prompted (options listed) and the option letters; checks arguments."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if not question.strip():
            raise ValueError("question must not be empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        letters: list[str] = []
        if options is not None:
            question, letters = _with_options(question, options)
        elif max_new_tokens == 0:
            raise ValueError("max_new_tokens must be at least 1 without options")
        return question, letters

    def _answer_steps(self, question: str, letters: list[str], max_new_tokens: int, stream: AnswerStream,
                      count: bool):
        """The greedy loop with explicit positions, one token id per step; returns the Answer."""
        model = self.model
        letter_ids = [model.tokenize(letter)[0] for letter in letters]
        t0 = time.perf_counter()
        generated: list[int] = []
        with self._answer_context(question, max_new_tokens) as (cache, logits, pos):
            ttft = time.perf_counter() - t0
            seen = (self._counts["frames"], self._counts["items"], self._counts["visual_tokens_kept"])
            stream.started = (ttft, *seen)
            scores = {l: float(logits[i]) for l, i in zip(letters, letter_ids)}
            for step in range(max_new_tokens):
                token = int(logits.argmax())
                if token in model.stop_token_ids:
                    break
                generated.append(token)
                yield token
                if step + 1 == max_new_tokens:
                    break
                logits = model.forward(model.embed_text(torch.tensor([token])),
                                       text_positions(pos, 1, model.position_axes), cache, logits="last")
                pos += 1
        seconds = time.perf_counter() - t0
        if count:
            self._counts["questions"] += 1
            self._counts["answer_seconds"] += seconds
        choice = max(scores, key=scores.get) if scores else None
        return Answer(model.detokenize(generated), choice, scores, generated, ttft, seconds, *seen)

    def question_logits(self, question: str) -> torch.Tensor:
        """Float32 logits ``[V]`` of the first answer token to ``question`` (the prompt as
        :meth:`ask` builds it without options); the question leaves no trace."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty str")
        with self._answer_context(question, 1) as (_, logits, _pos):
            return logits

    def _question_ids(self, question: str, max_new_tokens: int) -> list[int]:
        ids = self.model.question_ids(question, has_video=self._state.num_items > 0)
        if len(ids) + max_new_tokens > self.model.max_context:
            raise ValueError(f"question too long for the model's context: {len(ids)} question tokens + "
                             f"{max_new_tokens} new tokens, the model supports {self.model.max_context}")
        needed = self._state.max_position + 1 + len(ids) + max_new_tokens
        if needed > self.model.max_context and not self._warned_positions:
            # Long streams keep their original positions (that is what makes pruning and
            # eviction exact); past the trained length RoPE still computes, but the model
            # was never trained there. Say so once per stream rather than refuse to answer.
            self._warned_positions = True
            warnings.warn(f"positions up to {needed} exceed the model's trained context "
                          f"({self.model.max_context}); answers may degrade on streams this long (SlidingWindow "
                          f"and BudgetMemory re-index positions near the limit: reindex='lazy')",
                          RuntimeWarning, stacklevel=3)
        return ids

    @contextmanager
    def _answer_context(self, question: str, max_new_tokens: int):
        """Run the question turn at ``max position + 1`` on everything seen (a pending frame
        included); yields (cache, last logits, next position); on exit the question, the
        answer and any temporary item are gone."""
        model = self.model
        with self._pending_visible():
            ids = self._question_ids(question, max_new_tokens)
            start = self._state.max_position + 1
            embeds = model.embed_text(torch.tensor(ids, dtype=torch.long))
            positions = text_positions(start, len(ids), model.position_axes)
            with self._memory.answering(QuestionInput(embeds, positions)) as cache:
                logits = model.forward(embeds, positions, cache, logits="last")
                yield cache, logits, start + len(ids)

    # ---- proactive answers ----------------------------------------------------------------
    def watch(self, question: str, *, options: Sequence[str] | None = None, yes_no: bool = False,
              trigger: Trigger | None = None, min_interval: float = 0.0, max_new_tokens: int = 16,
              on_answer: Callable[[WatchEvent], None] | None = None) -> Watch:
        """Register a standing question (see :mod:`streampress.watch`): after each
        :meth:`add_frames` whose items fire ``trigger`` (default :class:`Trigger`: the
        temporal drop ratio falls below half its recent average), the question is asked
        without a trace, and its answer is emitted (``on_answer``, :meth:`poll_events`,
        ``watch.events``) when it differs from the last one emitted, or, with ``yes_no``,
        when it turns to "Yes". ``min_interval``: fewest stream seconds between two probes.
        Returns the :class:`Watch` (``cancel()`` ends it)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"watch question must be a non-empty str, got {question!r}")
        if options is not None and yes_no:
            raise ValueError("watch: options and yes_no=True exclude each other")
        if options is not None:
            _with_options(question, options)  # validates
        if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or not (
                0 <= min_interval < float("inf")):
            raise ValueError(f"watch min_interval must be seconds >= 0, got {min_interval!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"watch max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if trigger is not None and not isinstance(trigger, Trigger):
            raise TypeError(f"trigger must be a streampress.watch.Trigger, got {type(trigger).__name__}")
        if on_answer is not None and not callable(on_answer):
            raise TypeError(f"on_answer must be callable, got {type(on_answer).__name__}")
        w = Watch(question, list(options) if options is not None else None, bool(yes_no), float(min_interval),
                  max_new_tokens, on_answer, trigger=trigger or Trigger())
        w._remove = self._watches.remove
        self._watches.append(w)
        return w

    def poll_events(self) -> list[WatchEvent]:
        """The proactive answers emitted since the last call, in order."""
        events, self._events = self._events, []
        return events

    def _probe_watches(self, new: int) -> None:
        """Probe every due watch whose trigger fired on one of the ``new`` items just added;
        one decision per distinct trigger."""
        signals = self._signals
        first_new = max(0, len(signals) - new)
        fired: dict[Trigger, float | None] = {}
        now = self._last_time
        for w in list(self._watches):
            if w.trigger not in fired:
                fired[w.trigger] = first_firing(w.trigger, signals, first_new)
            at = fired[w.trigger]
            if at is None or not w.due(now):
                continue
            w.last_probe, w.probes = now, w.probes + 1
            w.probe_times.append((now, at))
            self._counts["watch_probes"] += 1
            try:
                if w.yes_no:
                    answer = self._answer(w.question, 0, ["Yes", "No"])
                    text = "Yes" if answer.choice == "A" else "No"
                else:
                    answer = self._answer(w.question, w.max_new_tokens, w.options)
                    text = answer.choice if w.options is not None else answer.text
            except Exception as exc:  # the stream is intact (a question leaves no trace); report it
                self._emit(WatchEvent(w, now, at, "", None, f"{type(exc).__name__}: {exc}"))
                continue
            news = w.emits(text)
            if w.yes_no or news:
                w.last_text = text
            if news:
                self._emit(WatchEvent(w, now, at, text, answer))

    def _emit(self, event: WatchEvent) -> None:
        event.watch.events.append(event)
        self._events.append(event)
        if event.watch.on_answer is not None:
            event.watch.on_answer(event)

    # ---- reporting ----------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters of this stream: frames, items, visual tokens seen/kept, KV cache length
        and bytes, seconds spent in the encoder, pruner, prefill and answers."""
        c = dict(self._counts)
        c["pending_frames"] = 0 if self._pending is None else int(self._pending.shape[0])
        c["kept_fraction"] = c["visual_tokens_kept"] / c["visual_tokens_seen"] if c["visual_tokens_seen"] else 1.0
        c["grid"] = list(self._grid_hw) if self._grid_hw else None
        c["stream_seconds"] = (self._last_time - self._state.start_time
                               if self._last_time is not None and self._state.start_time is not None else 0.0)
        c["next_text_position"] = self._state.max_position + 1
        c.update(self._memory.stats())
        c["pruner"] = getattr(self.pruner, "name", None if self.pruner is None else type(self.pruner).__name__)
        c["memory"] = getattr(self._policy, "name", type(self._policy).__name__)
        cacher_stats = getattr(self._cacher_state, "stats", None)
        if cacher_stats is not None and hasattr(cacher_stats, "as_dict"):
            # items encoded, references computed in full, scene-cut refreshes, and the
            # fraction of (token, block) pairs the encoder actually computed
            c.update({f"cacher_{k}": v for k, v in cacher_stats.as_dict().items()})
        return c

    @property
    def position_state(self) -> PositionState:
        """The stream's position bookkeeping (read-only)."""
        return self._state

    @property
    def memory(self) -> StreamMemory:
        """The per-stream memory store (cache and item blocks)."""
        return self._memory

    def _clock(self) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()


class AnswerStream:
    """An answer being generated (:meth:`StreamingSession.ask_stream`): iterate for token
    ids; ``started``: ``(time_to_first_token, frames, items, visual_tokens)`` once the
    question is prefilled; ``answer``: the :class:`Answer` once exhausted; ``close()``
    stops generating (the session is as before the question either way)."""

    def __init__(self):
        self._gen = None
        self.started: tuple[float, int, int, int] | None = None
        self.answer: Answer | None = None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.answer = stop.value
            raise

    def close(self) -> None:
        self._gen.close()


def _snapshot_of(obj):
    """``obj.snapshot()``, or a shallow copy of its attributes, or None (nothing to undo)."""
    if obj is None:
        return None
    if callable(getattr(obj, "snapshot", None)) and callable(getattr(obj, "restore", None)):
        return obj.snapshot()
    return dict(vars(obj)) if hasattr(obj, "__dict__") else None


def _restore_to(obj, snapshot) -> None:
    if callable(getattr(obj, "snapshot", None)) and callable(getattr(obj, "restore", None)):
        obj.restore(snapshot)
    else:
        attrs = vars(obj)
        attrs.clear()
        attrs.update(snapshot)


def _with_options(question: str, options: Sequence[str]) -> tuple[str, list[str]]:
    if isinstance(options, str) or not isinstance(options, (list, tuple)):
        raise TypeError(f"options must be a list of strings, got {type(options).__name__}")
    if not 2 <= len(options) <= len(_LETTERS):
        raise ValueError(f"options must hold 2 to {len(_LETTERS)} choices, got {len(options)}")
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError("options must be non-empty strings")
    letters = list(_LETTERS[:len(options)])
    lettered = all(o.strip()[:2] in (f"{l}.", f"{l})") for o, l in zip(options, letters))
    lines = [o.strip() if lettered else f"{l}. {o.strip()}" for o, l in zip(options, letters)]
    prompt = (
        question.strip() + "\n" + "\n".join(lines)
        + "\nAnswer with the option's letter from the given choices directly."
    )
    return prompt, letters
