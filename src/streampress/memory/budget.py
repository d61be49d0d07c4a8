"""KV memory within a budget: token-level, per-layer (and per-KV-head) eviction.

:class:`BudgetMemory` is the policy (``method="infinipot_v"`` or ``"hermes"``, see
:mod:`.infinipot` and :mod:`.hermes`); :class:`BudgetStore` is its per-stream store. The
definitions followed are those of ``KV_MEMORY.md`` (shared docs), sections 1-3.

Data structure. The cache stays a transformers ``DynamicCache`` whose layers hold
rectangular ``[1, KVH, S, D]`` tensors, all layers of equal ``S``::

    [ prefix (P tokens, never touched) | slot region (V slots) | chunk just appended ]

The *slot region* is described by a :class:`SlotTable` with one entry per (layer, KV
head, slot): the item the token came from (``-1``: a synthetic summary token), its raster
index ``row * W' + col`` on the item's grid (``-1``: the item's wrapper text, or a
summary), and its RoPE position ``[P_axes]``. Every compression is ONE gather per layer,
applied with the same index ``[KVH, K]`` to the keys, the values and the table (plus,
for HERMES, one appended summary slot per deep layer), so the table always says exactly
which token every cached row is. Different heads may keep different tokens (InfiniPot-V);
the budgets give every (layer, head) the same count, so the tensors stay rectangular.
The chunk a forward appended is *ingested* into the table by ``after_add`` (its blocks
carry item, raster indices and positions).

Items and blocks. ``store.blocks`` holds one :class:`~.base.Block` per item that still has
a token in some (layer, head): a block is released only when no layer and no head holds
any of its tokens (its wrapper text, e.g. Qwen3-VL timestamps, stays exactly as long,
in every layer, and is never scored or counted against the budget: KV_MEMORY.md 1.2.6).

Undo. ``mark()`` records the cache length and references to the (immutable) table and
counters; ``after_add`` builds every new tensor first and installs them only at the end,
so a failure anywhere (a guidance forward, a gather, out of memory) leaves the store as
it was and the session's ``rollback`` removes the chunk whole.

Positions. Kept keys keep their original positions (RoPE stays baked in, rows are copied
bit for bit); :func:`rotary_delta` / :func:`rotate` turn a post-RoPE key by a position
delta with the model's own rotary module (M-RoPE sections, contiguous or interleaved,
come from the model), used for HERMES's summary token. A store that places a token at a
new position (the summary) raises ``position_floor``; the session then starts the next
token (and questions) at or after it, so no two live tokens share a position. Position
re-indexing (``reindex``) is the one exception to "keys keep their positions": it turns
every region key to its compacted position, counts ``relocations`` and sets
``position_top``; the session then continues right after ``position_top``.

Decisions where the spec leaves a choice are listed in :class:`BudgetMemory` and the
README ("Memory policies"). The shared pieces (slot table, plan, TopK, rotary delta)
live in :mod:`.slots`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .base import Block, MemoryStore, _layers
from .hermes import Hermes
from .infinipot import InfiniPotV
from .slots import (
    REINDEX,
    Plan,
    SlotTable,
    compact_positions,
    kept_text,
    reindex_due,
    rotary_delta,
    rotate,
    stable_topk,
    turn_region,
)

__all__ = ["BudgetMemory", "BudgetStore", "SlotTable", "rotary_delta", "rotate", "stable_topk"]

METHODS = ("infinipot_v", "hermes")
POOLING = ("off", "code")


# ---- the policy ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetMemory:
    """Keep the KV cache within ``budget`` visual tokens per layer (and per KV head), choosing
    tokens, not items (KV_MEMORY.md): ``method="infinipot_v"`` (query-agnostic TaR + VaN,
    per layer and KV head) or ``method="hermes"`` (hierarchical: recency, guidance
    attention, cross-layer smoothing, a summary token in deep layers). The prompt prefix is
    never touched; questions run on the compressed cache and leave no trace.

    ``budget``: visual tokens per (layer, head). InfiniPot-V counts it in items:
    ``f = budget // p`` items of ``p`` grid tokens (floor, not round: the budget is a cap),
    ``|M| = f p``, compressed to ``|C| = floor(compress_ratio f) p``, keeping the
    ``r = max(1, floor(recent_ratio f))`` newest items whole; ``alpha`` is TaR's share;
    ``tar_alignment``: ``"coordinate"`` (paper) or ``"slot"`` (C-IPV parity).
    HERMES keeps exactly ``budget`` visual slots per layer after each compression;
    ``schedule``: ``"paper"`` (middle ``omega = 0.75 - 0.6 pi``) or ``"code"`` (``1 - 0.9 pi``);
    ``smoothing``: lambda of (shallow, middle, deep) layers; ``summary``: the deep layers'
    summary token; ``omega``: force one recency weight on every layer (oracle tests).
    ``reindex`` (both methods): ``"lazy"`` (default; HERMES's streaming setting, and
    InfiniPot-V's "original positions plus lazy compaction near the limit") compacts the
    cached positions once the largest passes ``max_context - 1024``; ``"eager"`` after
    every compression (HERMES's offline setting); ``"off"`` keeps original positions.
    Compaction (KV_MEMORY.md 3.4 step 10, App. E.2 for M-RoPE): per layer and KV head,
    each axis separately, a slot's position becomes ``P +`` its rank among the distinct
    positions there (``P``: the prompt prefix's length; the prefix keeps its positions),
    keys are turned by the delta (exact rotation), values untouched, and the stream goes on
    right after the new largest position (Qwen2/2.5-VL start their video anew there).
    ``pooling`` (InfiniPot-V): ``"off"`` (the released scripts) or ``"code"`` (the
    official code's depth schedule of average pooling on VaN scores).
    Compression runs after each ``add_frames`` call once the budget is reached (feed one
    item per call for InfiniPot-V's exact item schedule). ``chunk_frames`` (HERMES): check
    the budget only once this many frames arrived since the last check (the paper's chunk
    is 16 frames: 8 Qwen items, 16 LLaVA-OV items), whatever the calls' sizes: one guidance
    pass per chunk instead of per call, with up to ``|M|`` + a chunk of visual slots between
    checks; None (default): every call is a chunk."""

    method: str
    budget: int
    compress_ratio: float = 0.75
    recent_ratio: float = 0.125
    alpha: float = 0.5
    tar_alignment: str = "coordinate"
    schedule: str = "paper"
    smoothing: tuple[float, float, float] = (0.1, 0.3, 0.4)
    summary: bool = True
    omega: float | None = None
    reindex: str = "lazy"
    pooling: str = "off"
    chunk_frames: int | None = None
    name: str = field(default="budget", init=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"BudgetMemory method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 2:
            raise ValueError(f"BudgetMemory budget must be an int >= 2 (visual tokens per layer), got {self.budget!r}")

        def unit(name, value, low_open=False, high_open=False):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)):
                raise ValueError(f"BudgetMemory {name} must be a number in "
                                 f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}")

        unit("compress_ratio", self.compress_ratio, low_open=True, high_open=True)
        unit("recent_ratio", self.recent_ratio, high_open=True)
        unit("alpha", self.alpha)
        if self.tar_alignment not in ("coordinate", "slot"):
            raise ValueError(f"BudgetMemory tar_alignment must be 'coordinate' or 'slot', got {self.tar_alignment!r}")
        if self.schedule not in ("paper", "code"):
            raise ValueError(f"BudgetMemory schedule must be 'paper' or 'code', got {self.schedule!r}")
        if not isinstance(self.smoothing, (tuple, list)) or len(self.smoothing) != 3:
            raise ValueError(f"BudgetMemory smoothing must be 3 numbers (shallow, middle, deep), "
                             f"got {self.smoothing!r}")
        for lam in self.smoothing:
            unit("smoothing", lam)
        if self.omega is not None:
            unit("omega", self.omega)
        if self.reindex not in REINDEX:
            raise ValueError(f"BudgetMemory reindex must be one of {', '.join(REINDEX)}, got {self.reindex!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"BudgetMemory pooling must be one of {', '.join(POOLING)}, got {self.pooling!r}")
        if self.chunk_frames is not None and (isinstance(self.chunk_frames, bool) or not isinstance(
                self.chunk_frames, int) or self.chunk_frames < 1):
            raise ValueError(f"BudgetMemory chunk_frames must be None or an int >= 1, got {self.chunk_frames!r}")
        if self.chunk_frames is not None and self.method != "hermes":
            raise ValueError(f"BudgetMemory chunk_frames is HERMES's (method='hermes'; InfiniPot-V compresses on "
                             f"its item schedule), got method={self.method!r}")
        if self.pooling != "off" and self.method != "infinipot_v":
            raise ValueError(f"BudgetMemory pooling is InfiniPot-V's (method='infinipot_v'), "
                             f"got method={self.method!r}")
        if not isinstance(self.summary, bool):
            raise TypeError(f"BudgetMemory summary must be a bool, got {self.summary!r}")
        object.__setattr__(self, "smoothing", tuple(float(x) for x in self.smoothing))
        object.__setattr__(self, "name", self.method)

    def open(self, adapter) -> BudgetStore:
        return BudgetStore(adapter, self)


# ---- the store -------------------------------------------------------------------------------
class BudgetStore(MemoryStore):
    """Per-stream token-level memory (see the module docstring)."""

    def __init__(self, adapter, policy: BudgetMemory):
        super().__init__(adapter)
        self.policy = policy
        self.method = InfiniPotV(policy) if policy.method == "infinipot_v" else Hermes(policy, adapter)
        self.table: SlotTable | None = None
        self.prefix: int | None = None
        self.fresh: list[Block] = []  # blocks appended since the last after_add
        self.position_floor: int | None = None
        self.relocations = 0  # position re-indexings so far
        self.position_top: int | None = None  # the largest live position after the last one
        self.unchecked_frames = 0  # frames since the last budget check (chunk_frames)
        self.max_position = -1  # over every token ingested (kept or not)
        self.compressions = 0
        self.compress_seconds = 0.0
        self.last_compress_seconds = 0.0

    # ---- bookkeeping the session drives ----------------------------------------------------
    def add_blocks(self, blocks: Sequence[Block]) -> None:
        super().add_blocks(blocks)
        self.fresh = self.fresh + list(blocks)

    _MARKED = ("table", "prefix", "fresh", "position_floor", "max_position", "compressions", "compress_seconds",
               "last_compress_seconds", "relocations", "position_top", "unchecked_frames")

    def mark(self) -> tuple:
        return super().mark(), {name: getattr(self, name) for name in self._MARKED}

    def rollback(self, mark: tuple) -> None:
        base, attrs = mark
        super().rollback(base)
        for name, value in attrs.items():
            setattr(self, name, value)

    def visual_count(self) -> int:
        """Visual slots per (layer, head) in the slot region (after the last ``after_add``)."""
        if self.table is None:
            return 0
        return int(self.table.visual()[0, 0].sum())

    # ---- ingest + compress (atomic) --------------------------------------------------------
    def after_add(self, now: float) -> None:
        if not self.fresh:
            return
        table, prefix, max_position = self._ingested()
        t0 = time.perf_counter()
        chunk = self.policy.chunk_frames
        unchecked = self.unchecked_frames + len(self.fresh) * int(self.adapter.frames_per_item)
        check = chunk is None or unchecked >= chunk
        plan = self.method.plan(self, table, prefix, max_position) if check else None
        layers = None
        if plan is not None:
            layers, table = self._gathered(table, prefix, plan)
        floor = plan.position_floor if plan is not None else None
        top = None
        if self._reindex_due(table, max_position, floor, compressed=plan is not None):
            current = layers or [(layer.keys, layer.values) for layer in _layers(self.cache)]
            layers, table, top = self._reindexed(current, table, prefix)
        if layers is not None:
            self._synchronize()
        seconds = time.perf_counter() - t0
        # Commit: nothing above changed the store.
        before = self.visual_count() + sum(self._visual_in(b) for b in self.fresh)
        if layers is not None:
            for layer, (keys, values) in zip(_layers(self.cache), layers):
                layer.keys, layer.values = keys, values
        if plan is not None:
            present = set(table.item.unique().tolist())
            kept = [b for b in self.blocks if b.item in present]
            self.evicted_items += len(self.blocks) - len(kept)
            self.blocks = kept
            self.compressions += 1
            if floor is not None:
                self.position_floor = max(self.position_floor or 0, floor)
        if layers is not None:
            self.compress_seconds += seconds
            self.last_compress_seconds = seconds
        if top is not None:
            self.relocations += 1
            self.position_top, self.position_floor, max_position = top, None, top
        self.table, self.prefix, self.max_position, self.fresh = table, prefix, max_position, []
        self.unchecked_frames = 0 if check else unchecked
        self.evicted_tokens += max(0, before - self.visual_count())

    def _reindex_due(self, table: SlotTable, max_position: int, floor: int | None, compressed: bool) -> bool:
        """Position re-indexing (KV_MEMORY.md 3.4 step 10, :func:`.slots.reindex_due`): after a
        compression (eager), or once the largest position so far, the next token's included,
        passes the model's limit - 1024 (lazy)."""
        if table.slots == 0:
            return False
        # Every live position is an ingested token's (<= max_position; after a re-indexing
        # max_position is the new top) or a summary's (p* = floor - 1): no pass over the table.
        top = max(max_position, (floor or 0) - 1, (self.position_floor or 0) - 1)
        return reindex_due(self.policy.reindex, self.adapter, top, compressed)

    def _reindexed(self, layers: list, table: SlotTable, prefix: int) -> tuple[list, SlotTable, int]:
        """Keys turned to compacted positions (nothing installed): per (layer, KV head) and
        per axis, each slot's position becomes ``prefix +`` its rank among the distinct
        positions of that row (:func:`.slots.compact_positions`; the prompt prefix sits at
        ``0 .. prefix - 1`` and keeps its positions); every key is rotated by its own
        ``new - old`` (the model's rotary module, M-RoPE sections included); values are
        unchanged. Returns the new (keys, values) per layer, the new table and the largest
        new position (the session's next token goes right after it)."""
        old = table.pos.to(torch.int64)
        new = compact_positions(old, prefix)  # [L, H, P, V]
        delta = new - old
        out = []
        for l, (keys, values) in enumerate(layers):
            h, p, v = delta[l].shape
            cos, sin = rotary_delta(self.adapter, delta[l].permute(1, 0, 2).reshape(p, h * v))
            out.append((turn_region(keys, prefix, cos.view(h, v, -1), sin.view(h, v, -1)), values))
        top = max(prefix - 1, int(new.max()))
        return out, SlotTable(table.item, table.raster, new.to(table.pos.dtype)), top

    @staticmethod
    def _visual_in(block: Block) -> int:
        return block.length if block.raster is None else int((block.raster >= 0).sum())

    def _synchronize(self) -> None:
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)

    def _ingested(self) -> tuple[SlotTable, int, int]:
        """The table with the fresh blocks appended (a new table; the store is unchanged)."""
        layers = _layers(self.cache)
        if not layers:
            raise RuntimeError("budget memory: the cache is empty after a chunk")
        if layers[0].keys.shape[0] != 1:
            raise RuntimeError(f"budget memory expects a batch of one stream, got {layers[0].keys.shape[0]}")
        if len({int(layer.keys.shape[-2]) for layer in layers}) != 1:
            raise RuntimeError("budget memory expects every cache layer to hold the same number of tokens")
        fresh = self.fresh
        prefix = self.prefix if self.prefix is not None else fresh[0].start
        held = self.table.slots if self.table is not None else 0
        if fresh[0].start != prefix + held or self.length() != prefix + held + sum(b.length for b in fresh):
            raise RuntimeError("budget memory: the appended chunk does not follow the slot region")
        if any(b.positions is None for b in fresh):
            raise RuntimeError("budget memory needs each block's positions (Block.positions)")
        device = layers[0].keys.device
        n_layers, heads = len(layers), int(layers[0].keys.shape[1])
        item = torch.cat([torch.full((b.length,), b.item, dtype=torch.int32) for b in fresh])
        raster = torch.cat([(b.raster if b.raster is not None else torch.arange(b.length)).to(torch.int32)
                            for b in fresh])
        pos = torch.cat([b.positions.to(torch.int32) for b in fresh], dim=1)
        new = SlotTable(item.to(device).expand(n_layers, heads, -1),
                        raster.to(device).expand(n_layers, heads, -1),
                        pos.to(device).expand(n_layers, heads, *pos.shape))
        if self.table is not None:
            new = SlotTable(torch.cat([self.table.item, new.item], -1), torch.cat([self.table.raster, new.raster], -1),
                            torch.cat([self.table.pos, new.pos], -1))
        else:
            new = SlotTable(new.item.contiguous(), new.raster.contiguous(), new.pos.contiguous())
        max_position = max(self.max_position, int(pos.max()) if pos.numel() else -1)
        return new, prefix, max_position

    def _gathered(self, table: SlotTable, prefix: int, plan: Plan) -> tuple[list, SlotTable]:
        """New (keys, values) per layer and the new table for ``plan`` (nothing installed)."""
        layers = _layers(self.cache)
        text = kept_text(table, plan.keep, plan.protected)
        out, items, rasters, poss = [], [], [], []
        summaries = plan.summaries or [None] * len(layers)
        for l, (layer, keep) in enumerate(zip(layers, plan.keep)):
            h, v = table.item.shape[1:]
            keep = keep.to(table.item.device)
            text_idx = torch.arange(v, device=keep.device).expand(h, v)[text[l]].view(h, -1)
            idx = torch.cat([keep, text_idx], dim=1).sort(dim=1).values  # [H, K], slot order
            d = layer.keys.shape[-1]
            gi = idx.to(layer.keys.device)[None, :, :, None].expand(1, h, idx.shape[1], d)
            region_k = layer.keys[..., prefix:prefix + v, :].gather(2, gi)
            region_v = layer.values[..., prefix:prefix + v, :].gather(2, gi)
            it, ra = table.item[l].gather(1, idx), table.raster[l].gather(1, idx)
            po = table.pos[l].gather(2, idx[:, None, :].expand(h, table.pos.shape[2], idx.shape[1]))
            extra = summaries[l]
            if extra is not None:
                sk, sv, sp = extra
                region_k = torch.cat([region_k, sk.to(region_k.dtype)[None, :, None, :]], dim=2)
                region_v = torch.cat([region_v, sv.to(region_v.dtype)[None, :, None, :]], dim=2)
                it = torch.cat([it, it.new_full((h, 1), -1)], 1)
                ra = torch.cat([ra, ra.new_full((h, 1), -1)], 1)
                po = torch.cat([po, sp.to(po)[None, :, None].expand(h, -1, 1)], 2)
            out.append((torch.cat([layer.keys[..., :prefix, :], region_k], dim=2),
                        torch.cat([layer.values[..., :prefix, :], region_v], dim=2)))
            items.append(it), rasters.append(ra), poss.append(po)
        if len({t.shape[-1] for t in items}) != 1:
            raise RuntimeError("budget memory: a compression left layers of different lengths")
        return out, SlotTable(torch.stack(items), torch.stack(rasters), torch.stack(poss))

    # ---- reporting ------------------------------------------------------------------------
    def stats(self) -> dict:
        """Base counters (``items_in_memory``: items with a token in some layer or head;
        ``evicted_items``: blocks released; ``evicted_tokens``: visual slots removed per
        (layer, head), net of summaries) plus ``budget``, ``budget_method``,
        ``visual_slots`` (per layer and head now), ``slot_table_bytes`` (counted in the
        device / CPU bytes), ``compressions``, ``reindexes`` (position re-indexings),
        ``compress_seconds``, ``last_compress_seconds`` (re-indexing included)."""
        out = super().stats()
        table_bytes = self.table.nbytes() if self.table is not None else 0
        on_cpu = self.adapter.device.type == "cpu"
        out.update({"device_bytes": 0 if on_cpu else out["kv_cache_bytes"] + table_bytes,
                    "cpu_bytes": out["kv_cache_bytes"] + table_bytes if on_cpu else 0,
                    "budget": self.policy.budget, "budget_method": self.policy.method,
                    "visual_slots": self.visual_count(), "slot_table_bytes": table_bytes,
                    "compressions": self.compressions, "reindexes": self.relocations,
                    "compress_seconds": self.compress_seconds,
                    "last_compress_seconds": self.last_compress_seconds})
        return out
