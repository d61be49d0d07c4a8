"""The base of every memory policy: cache surgery, item blocks, the store that keeps everything.

Why a separate module: :mod:`.window` and :mod:`.retrieval` build on these pieces, and
the session needs only them (``Block``, ``QuestionInput``, ``resolve_memory``), so the
policies import this module and never each other.

A *policy* (:class:`FullMemory`, ``SlidingWindow``, ``RetrievalMemory``) is a small
configuration object the user passes as ``StreamingSession(..., memory=...)``. The
session calls ``policy.open(adapter)`` once per stream (and again on ``reset()``) to get a
:class:`MemoryStore`: the per-stream object that owns the KV cache and a table of
:class:`Block` s (one block per item: its cache span and its times). Policies hold no
stream state, so one policy object can configure any number of sessions.

The session talks to the store only through these calls (the ``StreamMemory`` protocol
of :mod:`streampress.protocols`):

- ``store.cache`` / ``store.length()``: the cache the next forward appends to;
- ``store.truncate(length)``: undo a failed forward (cache back to ``length`` tokens);
- ``mark = store.mark()`` / ``store.rollback(mark)``: undo everything a failed chunk (or a
  question's temporary item) appended: cache tokens and blocks (``after_add`` is atomic:
  it either evicts/offloads completely or leaves the store as it was);
- ``store.add_blocks(blocks)``: record the items a successful forward appended;
- ``store.after_add(now)``: eviction hook after each chunk (``now``: newest frame time);
- ``with store.answering(question) as cache:``: the cache a question and its answer run
  on; when the block exits the question and answer are gone again;
- ``store.stats()``: counters for ``session.stats()``;
- optionally ``store.position_floor`` (int or None): the lowest position the next token
  may take (a store that placed a token of its own, :mod:`.budget`'s HERMES summary).

Extension point: the retrieval policy (:mod:`.retrieval`) subclasses :class:`MemoryStore`
to move old blocks off the device in ``after_add`` and to assemble [recent window +
retrieved blocks] in ``answering`` (which receives the question's embeddings and
positions).

Positions are baked into cached keys (RoPE), so removing any block leaves the positions
of every other token unchanged: eviction never moves the rest of the stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["Block", "QuestionInput", "MemoryStore", "FullMemory", "resolve_memory", "cache_length",
           "cache_truncate", "cache_select", "cache_nbytes"]


# ---- cache surgery (works for transformers 4.57 and 5.x DynamicCache) ----------------------
def _layers(cache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None
            and layer.keys.numel() > 0]


def cache_length(cache) -> int:
    """Number of cached tokens."""
    layers = _layers(cache)
    return int(layers[0].keys.shape[-2]) if layers else 0


def cache_truncate(cache, length: int) -> None:
    """Keep the first ``length`` tokens of every layer (no copy)."""
    for layer in _layers(cache):
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def cache_select(cache, index: torch.Tensor) -> None:
    """Keep the tokens at ``index`` (int64, increasing) in every layer (all layers or none:
    the new tensors are built first, then installed)."""
    layers = _layers(cache)
    new = [(layer.keys.index_select(-2, i), layer.values.index_select(-2, i))
           for layer in layers for i in [index.to(layer.keys.device)]]
    for layer, (keys, values) in zip(layers, new):
        layer.keys, layer.values = keys, values


def cache_nbytes(cache) -> int:
    """Bytes held by cached keys and values."""
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in _layers(cache))


@dataclass(frozen=True)
class Block:
    """One item's span in the cache: ``[start, start + length)``; times on the stream clock;
    ``positions [P, length]``: the RoPE positions its cached tokens were rotated with;
    ``raster [length]`` (int64): each token's raster index ``row * W' + col`` on the item's
    grid, -1 for the item's wrapper text (token-level policies score visual tokens by
    their grid coordinate); ``grid``: the item's unpruned grid ``(H', W')``.
    Immutable: stores replace blocks (``dataclasses.replace``) instead of editing them, so a
    saved list of blocks stays valid. (Token-level stores, :mod:`.budget`, keep a block as
    long as any layer holds one of its tokens; there ``start`` / ``length`` describe the
    item as it was appended, and the store's slot table says where its tokens are now.)"""

    item: int
    start_time: float
    end_time: float
    start: int
    length: int
    positions: torch.Tensor | None = None
    raster: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


@dataclass
class QuestionInput:
    """What ``answering`` receives: the question's embeddings ``[L, D]`` and positions ``[P, L]``."""

    embeds: torch.Tensor
    positions: torch.Tensor


class MemoryStore:
    """Per-stream KV memory that keeps everything (the base of every policy's store)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.cache = adapter.new_cache()
        self.blocks: list[Block] = []
        self.evicted_items = 0
        self.evicted_tokens = 0

    def length(self) -> int:
        return cache_length(self.cache)

    def truncate(self, length: int) -> None:
        cache_truncate(self.cache, length)

    def add_blocks(self, blocks: Sequence[Block]) -> None:
        self.blocks.extend(blocks)

    def mark(self) -> tuple:
        """What :meth:`rollback` returns to: the cache length, the blocks and the counters."""
        return self.length(), list(self.blocks), self.evicted_items, self.evicted_tokens

    def rollback(self, mark: tuple) -> None:
        """Remove everything appended since ``mark`` (from :meth:`mark`; nothing may have
        been evicted or offloaded since: ``after_add`` is the last step of a chunk)."""
        length, blocks, self.evicted_items, self.evicted_tokens = mark
        self.truncate(length)
        self.blocks = list(blocks)

    def after_add(self, now: float) -> None:
        """Eviction hook, called after each chunk; the full memory keeps everything."""

    def evict(self, blocks: Sequence[Block]) -> None:
        """Remove ``blocks`` from the cache; later blocks' offsets are updated."""
        if not blocks:
            return
        index, kept_blocks, removed = self._without(blocks)
        cache_select(self.cache, index)
        self.blocks = kept_blocks
        self.evicted_items += len(blocks)
        self.evicted_tokens += removed

    def _without(self, blocks: Sequence[Block]) -> tuple[torch.Tensor, list[Block], int]:
        """What evicting ``blocks`` leaves, nothing changed yet: the cache rows kept (int64,
        increasing), the remaining blocks with their new offsets, the tokens removed."""
        keep = torch.ones(self.length(), dtype=torch.bool)
        for b in blocks:
            keep[b.start:b.start + b.length] = False
        # Blocks are disjoint and in cache order: each kept block moves back by the
        # tokens of the evicted blocks before it.
        gone = {id(b) for b in blocks}
        kept_blocks, removed = [], 0
        for b in self.blocks:
            if id(b) in gone:
                removed += b.length
                continue
            kept_blocks.append(replace(b, start=b.start - removed) if removed else b)
        return keep.nonzero().squeeze(1), kept_blocks, removed

    @contextmanager
    def answering(self, question: QuestionInput | None = None) -> Iterator[Any]:
        """The cache to answer on; everything appended inside is removed on exit."""
        length = self.length()
        try:
            yield self.cache
        finally:
            self.truncate(length)

    def stats(self) -> dict:
        nbytes = cache_nbytes(self.cache)
        on_cpu = self.adapter.device.type == "cpu"
        return {"kv_cache_tokens": self.length(), "kv_cache_bytes": nbytes,
                "device_bytes": 0 if on_cpu else nbytes, "cpu_bytes": nbytes if on_cpu else 0,
                "items_in_memory": len(self.blocks), "evicted_items": self.evicted_items,
                "evicted_tokens": self.evicted_tokens}


@dataclass(frozen=True)
class FullMemory:
    """Keep the whole stream in the KV cache (the default, ``memory="full"``)."""

    name: str = field(default="full", init=False)

    def open(self, adapter) -> MemoryStore:
        return MemoryStore(adapter)


def resolve_memory(memory) -> Any:
    """``"full"`` / None -> :class:`FullMemory`; any object with ``open(adapter)`` is a policy."""
    if memory is None or memory == "full":
        return FullMemory()
    if isinstance(memory, str):
        raise ValueError(f"memory must be 'full' or a policy such as streampress.SlidingWindow(seconds=30), "
                         f"got {memory!r}")
    if not callable(getattr(memory, "open", None)):
        raise TypeError(f"memory must be 'full' or a memory policy with open(adapter), got {type(memory).__name__}")
    return memory
