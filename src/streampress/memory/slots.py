"""The pieces of token-level memory that the budget methods share: the slot table, a
compression plan, deterministic TopK and the rotary-delta helper.

Its own module so that :mod:`.infinipot` and :mod:`.hermes` (the methods) and :mod:`.budget`
(the policy and its store, which imports the methods) import downwards only. See
:mod:`.budget` for the data structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SlotTable", "Plan", "rotary_delta", "rotate", "unrotate", "turn_region", "stable_topk", "minmax",
           "visual_slots", "kept_text", "compact_positions", "reindex_due", "REINDEX", "REINDEX_MARGIN"]

#: Position re-indexing modes (``reindex=``) of the memories that re-index.
REINDEX = ("lazy", "eager", "off")
#: Lazy re-indexing fires once a position passes ``max_context - REINDEX_MARGIN`` (P-HER; C-HER L174-182).
REINDEX_MARGIN = 1024


# ---- math helpers ----------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_delta(adapter, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` float32 ``[N, D]`` of the rotation by position deltas ``delta [P, N]``
    (any sign), from the model's own rotary module (``adapter.rotary``: M-RoPE sections
    included, each frequency taking its own axis' delta), WITHOUT the module's
    ``attention_scaling`` factor (a pure rotation: ``R(a) R(b) = R(a + b)``)."""
    cos, sin = adapter.rotary(delta)
    rotary = getattr(getattr(getattr(getattr(adapter, "hf_model", None), "model", None), "language_model", None),
                     "rotary_emb", None)
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    return cos / scale, sin / scale


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE ``keys [..., N, D]`` turned by the rotation ``(cos, sin) [N, D]`` (computed
    in at least float32, returned in that precision)."""
    k = keys.to(torch.promote_types(keys.dtype, torch.float32))
    return k * cos.to(k) + _rotate_half(k) * sin.to(k)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys before RoPE from keys after it (float32): RoPE turns each pair of channels
    ``(i, i + d/2)`` by an angle, ``y = x cos + rotate_half(x) sin``, and turning back is
    ``x = y cos - rotate_half(y) sin``. ``keys [..., L, d]``; ``cos, sin [L, d]``."""
    k = keys.float()
    return k * cos - _rotate_half(k) * sin


def turn_region(keys: torch.Tensor, prefix: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A cache layer's ``keys [1, H, S, D]`` with every row after the first ``prefix`` turned
    by ``(cos, sin)`` (broadcasting to ``[..., S - prefix, D]``), back in the keys' dtype."""
    turned = rotate(keys[..., prefix:, :], cos.to(keys.device), sin.to(keys.device)).to(keys.dtype)
    return torch.cat([keys[..., :prefix, :], turned], dim=-2)


def reindex_due(mode: str, adapter, top: int, changed: bool) -> bool:
    """Whether a memory re-indexes now: ``"eager"`` when it just evicted or compressed
    (``changed``), ``"lazy"`` once the largest position ``top`` passes the model's
    ``max_context - REINDEX_MARGIN``, never with ``"off"``."""
    if mode == "eager":
        return changed
    return mode == "lazy" and top > int(adapter.max_context) - REINDEX_MARGIN


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (along the last dim, increasing) of the ``k`` entries largest under the key
    ``(score, index)``: ties go to the later index (KV_MEMORY.md 1.1: newer item, then
    higher raster index). A stable sort, never ``torch.topk``'s unspecified tie order."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    return order[..., order.shape[-1] - k:].sort(dim=-1).values


def minmax(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` along the last dim."""
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return (x - lo) / (hi - lo + eps)


def compact_positions(pos: torch.Tensor, base: int) -> torch.Tensor:
    """Left-compaction of positions (P-HER 3.3 and App. E): along the last dim (the slots
    of one row, e.g. one layer and KV head), each axis separately, every value becomes
    ``base +`` its rank among the row's distinct values on that axis. Tokens that shared a
    coordinate still share it, order on every axis is kept, and 1-D positions become
    ``base, base + 1, ...`` in slot order. ``pos [..., V]`` int -> int64, same shape."""
    v = pos.to(torch.int64)
    if v.shape[-1] == 0:
        return v.clone()
    ordered, order = v.sort(dim=-1, stable=True)
    step = torch.ones_like(ordered, dtype=torch.bool)
    step[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    dense = step.to(torch.int64).cumsum(-1) - 1
    return torch.empty_like(dense).scatter_(-1, order, dense) + base


# ---- the slot table --------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotTable:
    """What every cached row of the slot region is, per (layer, KV head, slot); int32:
    ``item [L, H, V]`` (-1: summary), ``raster [L, H, V]`` (-1: wrapper text or summary),
    ``pos [L, H, P, V]`` (RoPE positions). Immutable: compressions build a new table."""

    item: torch.Tensor
    raster: torch.Tensor
    pos: torch.Tensor

    @property
    def slots(self) -> int:
        return int(self.item.shape[-1])

    def visual(self) -> torch.Tensor:
        """bool ``[L, H, V]``: visual slots (grid tokens and summaries), what budgets count."""
        return (self.raster >= 0) | (self.item < 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.item, self.raster, self.pos))


def visual_slots(table: SlotTable, layer: int) -> torch.Tensor:
    """int64 ``[H, n]``: per head of ``layer`` the region indices of its visual slots, in slot
    order (every head of a layer holds the same number)."""
    mask = table.visual()[layer]
    h, v = mask.shape
    return torch.arange(v, device=mask.device).expand(h, v)[mask].view(h, -1)


def kept_text(table: SlotTable, keep: Sequence[torch.Tensor], protected: Sequence[int]) -> torch.Tensor:
    """bool ``[L, H, V]``: the wrapper-text slots that stay when every layer keeps the
    visual slots ``keep[l] [H, K]``: those of items with a kept visual token in some
    (layer, head), or ``protected``."""
    items = torch.cat([table.item[l].gather(1, k.to(table.item.device)).reshape(-1) for l, k in enumerate(keep)])
    live = torch.unique(torch.cat([items.to(torch.int64), torch.as_tensor(list(protected), dtype=torch.int64,
                                                                          device=items.device)]))
    return (table.raster < 0) & (table.item >= 0) & torch.isin(table.item.to(torch.int64), live)


@dataclass
class Plan:
    """A compression decided by a method: per layer the region indices ``[H, K]``
    (increasing) of the visual slots to keep, optional summaries appended after the kept
    region (per layer None or ``(keys [H, D], values [H, D], pos [P])``), items whose
    wrapper text stays even without a visual token (the protected recent items), and the
    lowest position a later token may take (None: unchanged)."""

    keep: list[torch.Tensor]
    summaries: list[Any] | None = None
    protected: Sequence[int] = ()
    position_floor: int | None = None
