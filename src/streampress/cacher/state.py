"""Per-stream state of STC-Cacher: the current reference item and the interval count.

One :class:`CacherState` per stream (``cacher.new_state()``); nothing is shared between
streams or kept at module level. A call either succeeds and commits its changes at the
end, or fails. Bad input fails before any encoder block runs and leaves the state exactly
as it was. A call that brings a new reference frees the old one block by block as soon as
that block no longer needs it (so the old and new references never sit in memory
together); if such a call fails inside the tower, the half-replaced reference is dropped
whole and the stream's next item becomes a reference: the state is never inconsistent.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .core import AttentionPattern, BlockRef


@dataclass
class CacherStats:
    """Counters since the last ``reset()`` (tokens are counted per encoder block).

    ``first_block_similarity``: mean key similarity of each dependent item to its reference
    at the first block, recorded when a ``refresh_threshold`` is set (last 1000 items)."""

    items: int = 0
    references: int = 0
    refreshes: int = 0
    token_blocks: int = 0
    recomputed_token_blocks: int = 0
    first_block_similarity: list[float] = field(default_factory=list)

    @property
    def recompute_fraction(self) -> float:
        """Share of (token, block) pairs computed afresh (reference items count in full)."""
        return self.recomputed_token_blocks / self.token_blocks if self.token_blocks else 0.0

    def as_dict(self) -> dict:
        return {"items": self.items, "references": self.references, "refreshes": self.refreshes,
                "recompute_fraction": self.recompute_fraction}


class CacherState:
    """What one stream remembers: per encoder block the reference item's keys, values and
    branch outputs, the number of items since that reference, and counters.

    ``reset()`` starts a new stream. The stored reference is only reused by an item of the
    same encoder module and token layout (a different one becomes a new reference).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the reference, the interval count, the counters and scratch buffers."""
        self._blocks: list[BlockRef] | None = None
        self._signature: tuple | None = None
        self._module: weakref.ref | None = None
        self._since_ref: int = 0
        self._patterns: dict[tuple, AttentionPattern] = {}
        self._buffers: dict[str, Tensor] = {}
        self.stats = CacherStats()

    # ---- reference ------------------------------------------------------------------
    def reference_for(self, module, signature: tuple) -> list[BlockRef] | None:
        """The stored per-block reference if it fits this module and token layout."""
        if self._blocks is None or self._signature != signature:
            return None
        if self._module is None or self._module() is not module:
            return None
        return self._blocks

    @property
    def has_reference(self) -> bool:
        return self._blocks is not None

    @property
    def items_since_reference(self) -> int:
        return self._since_ref

    def _release_block(self, index: int) -> None:
        """Free block ``index`` of the stored reference: the running call replaces the
        reference and no longer needs that block (called by the cacher only)."""
        if self._blocks is not None:
            self._blocks[index] = None

    def _abort(self) -> None:
        """A call failed: drop a reference it had begun to free (called by the cacher only)."""
        if self._blocks is not None and any(b is None for b in self._blocks):
            self._blocks = self._signature = self._module = None
            self._since_ref = 0

    def _commit(self, module, signature: tuple, blocks: list[BlockRef] | None, since_ref: int,
                stats: CacherStats) -> None:
        """Install the outcome of a successful call (called by the cacher only)."""
        if blocks is not None:
            self._blocks = blocks
            self._signature = signature
            self._module = weakref.ref(module)
        self._since_ref = since_ref
        s = self.stats
        s.items += stats.items
        s.references += stats.references
        s.refreshes += stats.refreshes
        s.token_blocks += stats.token_blocks
        s.recomputed_token_blocks += stats.recomputed_token_blocks
        s.first_block_similarity.extend(stats.first_block_similarity)
        del s.first_block_similarity[:-1000]  # bounded over long streams

    # ---- undo ------------------------------------------------------------------------
    def snapshot(self) -> tuple:
        """The stream state as an opaque value for :meth:`restore`.

        It holds the current reference's blocks, so while a snapshot is alive a call that
        brings a new reference cannot free the old one early: the session takes one per
        ``add_frames`` call so that a failure at any later stage (pruning, prefill, memory)
        can return the encoder state to exactly what it was."""
        stats = replace(self.stats, first_block_similarity=list(self.stats.first_block_similarity))
        blocks = list(self._blocks) if self._blocks is not None else None
        return blocks, self._signature, self._module, self._since_ref, stats

    def restore(self, snapshot: tuple) -> None:
        """Return to the state ``snapshot`` (from :meth:`snapshot`) was taken in."""
        blocks, self._signature, self._module, self._since_ref, stats = snapshot
        self._blocks = list(blocks) if blocks is not None else None
        self.stats = replace(stats, first_block_similarity=list(stats.first_block_similarity))

    # ---- caches for speed (content-free, safe to drop at any time) ---------------------
    def pattern(self, lengths: tuple[int, ...], device: torch.device) -> AttentionPattern:
        """Attention pattern of an item with these window lengths (cached per layout)."""
        key = (lengths, str(device))
        pat = self._patterns.get(key)
        if pat is None:
            if len(self._patterns) > 16:
                self._patterns.clear()
            pat = self._patterns[key] = AttentionPattern.from_lengths(list(lengths), device)
        return pat

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A scratch tensor reused across blocks and calls (contents undefined)."""
        buf = self._buffers.get(name)
        numel = math.prod(shape)
        if buf is None or buf.dtype != dtype or buf.device != torch.device(device) or buf.numel() < numel:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def __repr__(self) -> str:
        return (f"CacherState(has_reference={self.has_reference}, items_since_reference={self._since_ref}, "
                f"stats={self.stats.as_dict()})")
