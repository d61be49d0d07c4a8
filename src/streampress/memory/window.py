"""Sliding-window memory: the cache keeps the last ``seconds`` of video (whole items).

Its own module so that each policy reads on its own page; it needs only the base store's
``evict`` (:mod:`.base`), which removes blocks without moving any other token's position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import MemoryStore

__all__ = ["SlidingWindow"]


class _WindowStore(MemoryStore):
    def __init__(self, adapter, seconds: float):
        super().__init__(adapter)
        self.seconds = seconds

    def after_add(self, now: float) -> None:
        self.evict([b for b in self.blocks if now - b.start_time > self.seconds])


@dataclass(frozen=True)
class SlidingWindow:
    """Keep the last ``seconds`` of video: after each chunk, every item whose first frame is
    more than ``seconds`` older than the newest frame leaves the cache (whole items; the
    prompt prefix always stays). Positions of the remaining tokens do not move."""

    seconds: float
    name: str = field(default="window", init=False)

    def __post_init__(self):
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not (
                self.seconds > 0 and self.seconds != float("inf")):
            raise ValueError(f"SlidingWindow seconds must be a positive finite number, got {self.seconds!r}")

    def open(self, adapter) -> MemoryStore:
        return _WindowStore(adapter, float(self.seconds))
