"""Sliding-window memory: the cache keeps the last ``seconds`` of video (whole items).

Its own module so that each policy reads on its own page. Eviction removes whole blocks
without moving any other token's position; only position re-indexing (``reindex``, near the
model's position limit by default) moves them, all at once (:func:`.slots.compact_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .base import MemoryStore, _layers
from .slots import REINDEX, compact_positions, reindex_due, rotary_delta, turn_region

__all__ = ["SlidingWindow"]


class _WindowStore(MemoryStore):
    def __init__(self, adapter, seconds: float, reindex: str):
        super().__init__(adapter)
        self.seconds = seconds
        self.reindex = reindex
        self.prefix: int | None = None  # tokens before the first item (never moved)
        self.relocations = 0  # position re-indexings so far
        self.position_top: int | None = None  # the largest live position after the last one

    def add_blocks(self, blocks) -> None:
        if self.prefix is None and blocks:
            self.prefix = blocks[0].start
        super().add_blocks(blocks)

    def mark(self) -> tuple:
        return super().mark(), (self.prefix, self.relocations, self.position_top)

    def rollback(self, mark: tuple) -> None:
        base, (self.prefix, self.relocations, self.position_top) = mark
        super().rollback(base)

    def after_add(self, now: float) -> None:
        old = [b for b in self.blocks if now - b.start_time > self.seconds]
        if not self._reindex_due(old):
            self.evict(old)
            return
        # Evict and re-index as one step: every new tensor is built before any is installed.
        prefix = self.prefix
        index, kept, removed = self._without(old)
        pos = torch.cat([b.positions.to(torch.int64) for b in kept], dim=1)  # [P, region], cache order
        new = compact_positions(pos, prefix)
        cos, sin = rotary_delta(self.adapter, new - pos)
        layers = []
        for layer in _layers(self.cache):
            i = index.to(layer.keys.device)
            layers.append((turn_region(layer.keys.index_select(-2, i), prefix, cos, sin),
                           layer.values.index_select(-2, i)))
        blocks = [replace(b, positions=new[:, b.start - prefix:b.start - prefix + b.length]) for b in kept]
        # Commit.
        for layer, (k, v) in zip(_layers(self.cache), layers):
            layer.keys, layer.values = k, v
        self.evicted_items += len(old)
        self.evicted_tokens += removed
        self.blocks = blocks
        self.relocations += 1
        self.position_top = max(prefix - 1, int(new.max()))

    def _reindex_due(self, old) -> bool:
        gone = {id(b) for b in old}
        kept = [b for b in self.blocks if id(b) not in gone]
        if not kept or any(b.positions is None for b in kept):
            return False
        return reindex_due(self.reindex, self.adapter, max(int(b.positions.max()) for b in kept), bool(old))

    def stats(self) -> dict:
        out = super().stats()
        out["reindexes"] = self.relocations
        return out


@dataclass(frozen=True)
class SlidingWindow:
    """Keep the last ``seconds`` of video: after each chunk, every item whose first frame is
    more than ``seconds`` older than the newest frame leaves the cache (whole items; the
    prompt prefix always stays). Eviction moves no other token's position.

    ``reindex``: positions of a long stream grow without end (LLaVA-OneVision-7B spends its
    32,768 in about 170 frames). ``"lazy"`` (default): once the largest cached position
    passes the model's limit minus 1,024, the cached items' positions are left-compacted
    (per axis, a token's position becomes the prefix length plus its rank among the
    distinct positions kept; every key turned by its own delta with the model's rotary
    module, values untouched) and the stream continues right after them, as
    ``BudgetMemory`` does (KV_MEMORY.md 3.4 step 10). ``"eager"``: after every eviction.
    ``"off"``: original positions always (past the limit the session warns once)."""

    seconds: float
    reindex: str = "lazy"
    name: str = field(default="window", init=False)

    def __post_init__(self):
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not (
                self.seconds > 0 and self.seconds != float("inf")):
            raise ValueError(f"SlidingWindow seconds must be a positive finite number, got {self.seconds!r}")
        if self.reindex not in REINDEX:
            raise ValueError(f"SlidingWindow reindex must be one of {', '.join(REINDEX)}, got {self.reindex!r}")

    def open(self, adapter) -> MemoryStore:
        return _WindowStore(adapter, float(self.seconds), self.reindex)
