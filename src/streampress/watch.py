"""Proactive answers: standing questions that a stream answers when its scene changes.

``session.watch(question)`` registers a :class:`Watch` on a
:class:`~streampress.session.StreamingSession`. The session measures, for every item it
ingests, a *change signal* and decides once per chunk, for all its watches together,
whether to probe them; a probe is an ordinary question that leaves no trace on the stream.

**The change signal** is the fraction of an item's visual tokens that the temporal step of
TimeChat-Online's differential token drop would drop: ``drop_t = mean over (h, w) of
[cos(x_t[h, w], x_{t-1}[h, w]) > tau]`` on the post-projector grids (``tau = 0.5``, the
paper's first operating point, :data:`TAU`). It is computed from the grids the session already has, for
any pruner or none, in one vectorised pass per chunk (two, with the lag-2 comparison
below). The first item of a stream has no signal (nothing to compare with).

**The trigger rule** (:class:`Trigger`), TimeChat-Online's idea that a scene transition is
where the drop ratio falls: an item *fires* when

- ``mode="relative"`` (default): ``drop_t < ratio * mean(drop over the previous `history`
  items)`` (``ratio = 0.5``, ``history = 8``; at least one previous signal is needed), or
- ``mode="threshold"``: ``drop_t < threshold``.

where the limit is compared with ``drop_t`` and also with ``drop2_t``, the same fraction
against the item two back, unless item ``t - 1`` fired: a cut that falls inside a
temporal patch (Qwen reads frames in pairs) splits its change over two items, each of
which may drop about half, while the item after it differs from the one before the cut
everywhere. A static scene drops nearly everything (``drop`` near 1); a cut keeps nearly
everything (``drop`` near 0), so both rules fire at cuts and stay silent inside a shot. When a chunk
holds several items, one firing item is enough; each watch then probes once, after the
chunk, over every frame seen so far, unless it probed less than ``min_interval`` stream
seconds ago.

**Emission.** A watch emits a :class:`WatchEvent` (to ``on_answer`` and to the session's
event list) when its answer differs from the last one it emitted; a yes/no watch
(``yes_no=True``) answers "Yes" or "No" by comparing the two words' first-token logits and
emits only when its answer turns to "Yes".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Trigger", "Watch", "WatchEvent", "change_signal", "first_firing", "firing_items", "TAU", "Signal"]

#: An item's change signal: (drop ratio against the item before, against the item two before).
Signal = tuple[float | None, float | None]

#: Similarity above which the temporal step drops a token (TimeChat-Online's tau = 0.5).
TAU = 0.5


def _drop_fraction(cur: torch.Tensor, prev: torch.Tensor, tau: float, eps: float) -> list[float]:
    sim = (F.normalize(cur, dim=-1, eps=eps) * F.normalize(prev, dim=-1, eps=eps)).sum(-1)
    return (sim > tau).float().mean(dim=(1, 2)).tolist()


def change_signal(grids: torch.Tensor, previous: torch.Tensor | None, tau: float) -> list[Signal]:
    """Per item of ``grids [T, H, W, D]``, ``(drop, drop2)``: the fraction of positions whose
    token has cosine similarity above ``tau`` with the same position one item before
    (``drop``, the DTD drop ratio) and two items before (``drop2``). ``previous [k, H, W, D]``
    (k <= 2, oldest first) holds the stream's items before these; None where an item has
    no such predecessor."""
    x = grids.float()
    before = x.new_zeros((0, *x.shape[1:])) if previous is None else previous.float().to(x.device)
    seq = torch.cat([before, x])  # every item with its predecessors
    k = before.shape[0]
    eps = torch.finfo(torch.float32).tiny + 1e-12 * float(seq.abs().amax()) if seq.numel() else 1e-12
    out = []
    lag1 = _drop_fraction(seq[1:], seq[:-1], tau, eps) if seq.shape[0] > 1 else []
    lag2 = _drop_fraction(seq[2:], seq[:-2], tau, eps) if seq.shape[0] > 2 else []
    for i in range(k, seq.shape[0]):  # index in seq of each new item
        out.append((lag1[i - 1] if i >= 1 else None, lag2[i - 2] if i >= 2 else None))
    return out


@dataclass(frozen=True)
class Trigger:
    """When a stream's change signal fires (see the module docstring)."""

    mode: str = "relative"
    ratio: float = 0.5
    history: int = 8
    threshold: float = 0.5

    def __post_init__(self):
        if self.mode not in ("relative", "threshold"):
            raise ValueError(f"Trigger mode must be 'relative' or 'threshold', got {self.mode!r}")
        for name in ("ratio", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Trigger {name} must be a finite number, got {value!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"Trigger ratio must be in (0, 1], got {self.ratio!r}")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"Trigger history must be an int >= 1, got {self.history!r}")

    def fires(self, signal: Signal, recent: Sequence[float], previous_fired: bool = False) -> bool:
        """Whether an item with ``signal = (drop, drop2)`` fires, after the ``recent`` drop
        ratios (oldest first); ``previous_fired``: the item before it fired."""
        drop, drop2 = signal
        if self.mode == "threshold":
            limit = self.threshold
        else:
            past = list(recent)[-self.history:]
            if not past:
                return False
            limit = self.ratio * (sum(past) / len(past))
        if drop is not None and drop < limit:
            return True
        # A cut inside a temporal patch splits its change over two items: compare with
        # the item two back too, unless the item between already fired for this change.
        return drop2 is not None and drop2 < limit and not previous_fired


def firing_items(trigger: Trigger, signals: Sequence[tuple[float, Signal]]) -> list[int]:
    """Indices into ``signals`` (``(time, signal)`` pairs of a stream, oldest first) of the
    items that fire ``trigger``."""
    past: list[float] = []
    fired, previous = [], False
    for i, (_, signal) in enumerate(signals):
        previous = trigger.fires(signal, past, previous)
        if previous:
            fired.append(i)
        if signal[0] is not None:
            past.append(signal[0])
    return fired


def first_firing(trigger: Trigger, signals: Sequence[tuple[float, Signal]], start: int) -> float | None:
    """The time of the first item from ``signals[start:]`` that fires ``trigger``, or None."""
    return next((signals[i][0] for i in firing_items(trigger, signals) if i >= start), None)


@dataclass
class WatchEvent:
    """A proactive answer: ``time`` (stream seconds of the newest frame the probe saw),
    ``trigger_time`` (stream seconds of the item that fired), the answer's ``text`` and the
    :class:`~streampress.session.Answer` itself (None when the probe failed: ``error``)."""

    watch: Watch
    time: float
    trigger_time: float
    text: str
    answer: object | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {"watch": self.watch.question, "time": self.time, "trigger_time": self.trigger_time,
                "text": self.text, **({"error": self.error} if self.error else {})}


@dataclass(eq=False)
class Watch:
    """A standing question on one stream (returned by ``session.watch``); ``cancel()`` ends it."""

    question: str
    options: list[str] | None = None
    yes_no: bool = False
    min_interval: float = 0.0
    max_new_tokens: int = 16
    on_answer: Callable[[WatchEvent], None] | None = None
    last_text: str | None = None
    last_probe: float | None = None
    probes: int = 0
    probe_times: list[tuple[float, float]] = field(default_factory=list)  # (time, trigger_time) of each probe
    events: list[WatchEvent] = field(default_factory=list)
    active: bool = True
    trigger: Trigger = field(default_factory=Trigger)
    _remove: Callable[[Watch], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop watching (no further probes or events)."""
        if self.active:
            self.active = False
            if self._remove is not None:
                self._remove(self)

    def due(self, now: float) -> bool:
        return self.active and (self.last_probe is None or now - self.last_probe >= self.min_interval)

    def emits(self, text: str) -> bool:
        """Whether ``text`` is news: different from the last emitted answer (yes/no: turned to Yes)."""
        if self.yes_no:
            return text == "Yes" and self.last_text != "Yes"
        return text != self.last_text
