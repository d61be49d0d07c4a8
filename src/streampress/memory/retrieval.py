"""Retrieval memory (ReKV-style): old video leaves the device, questions fetch what they need.

A :class:`RetrievalMemory` policy keeps the live KV cache at [prompt prefix + recent
window]. After each chunk (``after_add``), items older than ``window_seconds`` move, in
blocks of ``block_items`` consecutive items, from the live cache to CPU memory (pinned
when the cache is on CUDA, so that fetching them back is an asynchronous copy). Each
offloaded block keeps, per layer, a *summary key*: the mean of its keys per KV head
*before RoPE*, computed once when it is offloaded (the cached keys rotated back with the
positions they were rotated with, using the model's own rotary module).

When a question arrives, every decoder layer chooses its own top-k blocks: a forward
pre-hook on the layer's self-attention (installed only while answering, always removed)
computes the question's query states from the hidden states the layer receives (the
model adapter's ``query_states``: the layer's own query projection, and per-head norm
where the family has one (Qwen3), before RoPE), scores each block by the mean over
question tokens and query heads of ``q . summary`` of the matching KV head, and writes
that layer's cache as [prefix + chosen blocks in stream order + window] before the
attention appends the question's keys. As in ReKV, queries and
summaries are compared without rotary embeddings, so a block's score does not depend on
how long ago it was seen (two identical inputs at different times score equally). The
hook recognises the session's own forward by the identity of the cache object it is
handed, whatever the keyword (``past_key_values`` before transformers 5.24, ``cache``
after). The attention mask the model built for the live length is widened to the layer's
length (all past tokens visible, the question causal). The choice is kept for the
generated answer tokens (one retrieval per question). On exit every layer returns to
[prefix + window]; offloaded blocks stay where they are, so the stream continues. Blocks
keep their original positions: RoPE is baked into the cached keys and nothing is
re-rotated, so with k large enough to fetch every block the question sees exactly the
full cache.

Everything belongs to the per-stream :class:`RetrievalStore`; the policy object holds only
configuration. What the store needs from the model comes from the model adapter
(``attention_modules()``, ``query_states(attn, hidden)``, ``rotary(positions)``): the
knowledge of each family's attention lives in :mod:`streampress.models`, this module
never looks inside a Hugging Face model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .base import Block, MemoryStore, QuestionInput, cache_nbytes
from .slots import unrotate

__all__ = ["RetrievalMemory", "RetrievalStore", "OffloadedBlock", "block_scores", "unrotate"]


# ---- math ------------------------------------------------------------------------------------
def block_scores(queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """Score of each block: the mean over question tokens and query heads of ``q . s`` with
    ``s`` the block's summary key of the KV head serving that query head (GQA: query head h
    reads KV head ``h // (heads / kv_heads)``).

    ``queries [B, H, L, d]``; ``summaries [N, KVH, d]`` -> float32 ``[N]`` (on the
    summaries' device). The score is linear in q, so the query is averaged first."""
    heads, kv_heads, dim = queries.shape[1], summaries.shape[1], summaries.shape[2]
    if heads % kv_heads or queries.shape[-1] != dim:
        raise ValueError(f"queries [B, {heads}, L, {queries.shape[-1]}] do not match summaries "
                         f"[N, {kv_heads}, {dim}]")
    qbar = queries.float().mean(dim=(0, 2)).view(kv_heads, heads // kv_heads, dim).sum(1) / heads
    return summaries.float().reshape(summaries.shape[0], -1) @ qbar.to(summaries.device).reshape(-1)


def _widen_mask(mask, kv_length: int):
    """The model's mask for ``q`` question tokens over the live cache, widened to
    ``kv_length`` keys: every past token visible, the last ``q`` columns as built."""
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] == kv_length:
        return mask
    q = mask.shape[-2]
    if mask.shape[-1] < q or kv_length < q:
        raise RuntimeError(f"unexpected attention mask shape {tuple(mask.shape)} for {kv_length} keys")
    fill = True if mask.dtype == torch.bool else 0.0
    head = mask.new_full((*mask.shape[:-1], kv_length - q), fill)
    return torch.cat([head, mask[..., mask.shape[-1] - q:]], dim=-1)


# ---- host memory -----------------------------------------------------------------------------
class _HostArena:
    """CPU memory for offloaded blocks. Pinned memory comes from power-of-two slabs (the CUDA
    host allocator rounds every allocation up to a power of two, so one pinned tensor per
    block could waste up to half); unpinned memory is allocated per block, exactly.
    Blocks are never freed one by one: the arena lives as long as its stream."""

    SLAB = 1 << 26  # 64 MiB
    ALIGN = 256

    def __init__(self, pinned: bool, slabs: bool | None = None):
        self.pinned = pinned
        self.use_slabs = pinned if slabs is None else slabs
        self.slabs: list[torch.Tensor] = []
        self.used = 0  # bytes in the current slab
        self.reserved = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.use_slabs:
            out = torch.empty(shape, dtype=dtype)
            self.reserved += out.numel() * out.element_size()
            return out
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not self.slabs or self.used + nbytes > self.slabs[-1].numel():
            size = max(self.SLAB, 1 << max(nbytes - 1, 1).bit_length())
            self.slabs.append(torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned))
            self.reserved += size
            self.used = 0
        out = self.slabs[-1][self.used:self.used + nbytes].view(dtype).view(shape)
        self.used += -(-nbytes // self.ALIGN) * self.ALIGN
        return out

    def mark(self) -> tuple:
        return len(self.slabs), self.used, self.reserved

    def rollback(self, mark: tuple) -> None:
        """Forget what was handed out since ``mark`` (a failed offload)."""
        slabs, self.used, self.reserved = mark
        del self.slabs[slabs:]


# ---- the policy and its store ------------------------------------------------------------------
@dataclass
class OffloadedBlock:
    """A block of consecutive items in CPU memory: ``data [layers, 2 (keys, values), B, KVH,
    length, head_dim]`` as cached (original positions baked in), and its time span."""

    first_item: int
    num_items: int
    start_time: float
    end_time: float
    length: int
    data: torch.Tensor


@dataclass(frozen=True)
class RetrievalMemory:
    """Keep [prompt prefix + last ``window_seconds`` of video] in the live KV cache; move older
    items to CPU memory in blocks of ``block_items`` consecutive items (1 item = a Qwen
    temporal patch of 2 frames, or a LLaVA-OneVision frame); at each question every layer
    fetches its ``top_k`` most relevant blocks back (see the module docstring).
    ``top_k=0`` answers from prefix + window only. ``pin_memory``: pin the CPU copies (default:
    when the model is on CUDA)."""

    window_seconds: float
    top_k: int
    block_items: int = 1
    pin_memory: bool | None = None
    name: str = field(default="retrieval", init=False)

    def __post_init__(self):
        w = self.window_seconds
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
            raise ValueError(f"RetrievalMemory window_seconds must be a positive finite number of seconds, got {w!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"RetrievalMemory top_k must be an int >= 0 (blocks fetched per layer), "
                             f"got {self.top_k!r}")
        if isinstance(self.block_items, bool) or not isinstance(self.block_items, int) or self.block_items < 1:
            raise ValueError(f"RetrievalMemory block_items must be an int >= 1 (items per block), "
                             f"got {self.block_items!r}")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise TypeError(f"RetrievalMemory pin_memory must be None or a bool, got {self.pin_memory!r}")

    def open(self, adapter) -> RetrievalStore:
        return RetrievalStore(adapter, self)


class RetrievalStore(MemoryStore):
    """Per-stream retrieval memory: the live cache, the offloaded blocks and their summaries."""

    def __init__(self, adapter, policy: RetrievalMemory):
        if not callable(getattr(adapter, "attention_modules", None)):
            raise TypeError("RetrievalMemory needs a model adapter whose language model has decoder layers "
                            f"(ModelAdapter.attention_modules()), got {type(adapter).__name__}")
        self.attention = adapter.attention_modules()  # validates the model first
        super().__init__(adapter)
        self.policy = policy
        self.pinned = policy.pin_memory if policy.pin_memory is not None else adapter.device.type == "cuda"
        if self.pinned and not torch.cuda.is_available():
            raise ValueError("RetrievalMemory pin_memory=True needs CUDA (pinned memory speeds up copies "
                             "to a GPU); use pin_memory=None or False")
        self.offloaded: list[OffloadedBlock] = []
        self._summaries: torch.Tensor | None = None  # [capacity, layers, KVH, d] float32, CPU
        self._lengths: list[int] = []
        self._arena = _HostArena(self.pinned)
        self.offloaded_bytes = 0
        self.offloaded_tokens = 0
        self.offloaded_items = 0
        self.last_retrieved: list[list[int]] = []  # per layer: indices into self.offloaded

    # ---- offloading ------------------------------------------------------------------------
    def after_add(self, now: float) -> None:
        """Offload whole blocks of items older than the window (oldest first)."""
        old = sum(1 for b in self.blocks if now - b.start_time > self.policy.window_seconds)
        n = old - old % self.policy.block_items
        if n:
            self._offload(self.blocks[:n])

    def _offload(self, blocks: list[Block]) -> None:
        for a, b in zip(blocks, blocks[1:]):
            if b.start != a.start + a.length:
                raise RuntimeError("retrieval memory expects the live items to be contiguous in the cache")
        s0, s1 = blocks[0].start, blocks[-1].start + blocks[-1].length
        layers = self.cache.layers
        keys = torch.stack([layer.keys[..., s0:s1, :] for layer in layers])  # [NL, B, KVH, S, d]
        if keys.shape[1] != 1:
            raise RuntimeError(f"retrieval memory expects a batch of one stream, got {keys.shape[1]}")
        values = torch.stack([layer.values[..., s0:s1, :] for layer in layers])
        if any(b.positions is None for b in blocks):
            raise RuntimeError("retrieval memory needs each block's positions (Block.positions)")
        cos, sin = self.adapter.rotary(torch.cat([b.positions for b in blocks], dim=1))
        per = self.policy.block_items
        groups = [blocks[i:i + per] for i in range(0, len(blocks), per)]
        lengths = torch.tensor([sum(b.length for b in g) for g in groups])
        # Summary keys: per group, layer and KV head, the mean of the group's keys before
        # RoPE (one pass).
        gid = torch.repeat_interleave(torch.arange(len(groups)), lengths).to(keys.device)
        sums = torch.zeros(*keys.shape[:3], len(groups), keys.shape[-1], dtype=torch.float32, device=keys.device)
        sums.index_add_(3, gid, unrotate(keys, cos.to(keys.device), sin.to(keys.device)))
        means = (sums / lengths.clamp(min=1).to(sums).view(-1, 1)).squeeze(1).permute(2, 0, 1, 3).cpu()
        arena = self._arena.mark()
        try:
            new = self._copy_out(groups, lengths.tolist(), keys, values)
            summaries = self._grow_summaries(means)
        except BaseException:
            self._arena.rollback(arena)
            raise
        # Commit: nothing above changed the store.
        for layer in layers:
            layer.keys = torch.cat([layer.keys[..., :s0, :], layer.keys[..., s1:, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :s0, :], layer.values[..., s1:, :]], dim=-2)
        self._summaries = summaries
        self.offloaded.extend(new)
        self._lengths.extend(lengths.tolist())
        self.blocks = [replace(b, start=b.start - (s1 - s0)) for b in self.blocks[len(blocks):]]
        self.offloaded_tokens += s1 - s0
        self.offloaded_items += len(blocks)
        self.offloaded_bytes += sum(blk.data.numel() * blk.data.element_size() for blk in new)

    def _copy_out(self, groups: list[list[Block]], lengths: list[int], keys: torch.Tensor,
                  values: torch.Tensor) -> list[OffloadedBlock]:
        """CPU copies of the groups' keys and values ``[layers, B, KVH, S, d]``."""
        new, offset = [], 0
        for g, length in zip(groups, lengths):
            data = self._arena.empty((keys.shape[0], 2, *keys.shape[1:3], length, keys.shape[-1]), keys.dtype)
            data[:, 0].copy_(keys[..., offset:offset + length, :])
            data[:, 1].copy_(values[..., offset:offset + length, :])
            new.append(OffloadedBlock(g[0].item, len(g), g[0].start_time, g[-1].end_time, length, data))
            offset += length
        return new

    def _grow_summaries(self, means: torch.Tensor) -> torch.Tensor:
        n = len(self.offloaded)
        buf = self._summaries
        if buf is None or n + means.shape[0] > buf.shape[0]:
            cap = max(16, 2 * (n + means.shape[0]))
            grown = torch.empty(cap, *means.shape[1:], dtype=torch.float32)
            if buf is not None:
                grown[:n] = buf[:n]
            buf = grown
        buf[n:n + means.shape[0]] = means
        return buf

    def summaries(self, layer: int) -> torch.Tensor:
        """Summary keys ``[N, KVH, d]`` (float32, CPU) of the offloaded blocks at ``layer``."""
        n = len(self.offloaded)
        if self._summaries is None:
            return torch.zeros(0, 0, 0)
        return self._summaries[:n, layer]

    # ---- answering ---------------------------------------------------------------------
    def choose(self, layer: int, queries: torch.Tensor) -> list[int]:
        """Indices (into :attr:`offloaded`, increasing = stream order) of the ``top_k`` blocks
        whose summary keys at ``layer`` score highest for ``queries [B, H, L, d]``; blocks
        without tokens (fully pruned items) come last."""
        scores = block_scores(queries, self.summaries(layer))
        scores[torch.tensor(self._lengths) == 0] = -float("inf")
        k = min(self.policy.top_k, scores.numel())
        return sorted(torch.topk(scores, k).indices.tolist())

    @contextmanager
    def answering(self, question: QuestionInput | None = None) -> Iterator[Any]:
        """The cache to answer on: per layer [prefix + top-k blocks + window] (see the module
        docstring); on exit the live cache is [prefix + window] again, hooks removed."""
        if not self.offloaded or self.policy.top_k == 0:
            self.last_retrieved = [[] for _ in self.cache.layers]
            with super().answering(question) as cache:
                yield cache
            return
        layers = list(self.cache.layers)
        saved = [(layer.keys, layer.values) for layer in layers]
        prefix = self.length() - sum(b.length for b in self.blocks)
        chosen: dict[int, list[int]] = {}

        def hook(idx, module, args, kwargs):
            # Only this stream's forward (sessions may share the model): it carries our
            # cache, under whatever keyword the transformers version uses.
            if not any(v is self.cache for v in (*args, *kwargs.values())):
                return None
            layer = self.cache.layers[idx]
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if idx not in chosen:  # the question's forward: retrieve once, keep for the answer
                queries = self.adapter.query_states(module, hidden)
                chosen[idx] = self.choose(idx, queries)
                keys, values = saved[idx]
                fetched = torch.cat([self.offloaded[i].data[idx].to(keys.device, non_blocking=self.pinned)
                                     for i in chosen[idx]], dim=-2)
                layer.keys = torch.cat([keys[..., :prefix, :], fetched[0], keys[..., prefix:, :]], dim=-2)
                layer.values = torch.cat([values[..., :prefix, :], fetched[1], values[..., prefix:, :]], dim=-2)
            if "attention_mask" in kwargs:
                kwargs["attention_mask"] = _widen_mask(kwargs["attention_mask"],
                                                       layer.keys.shape[-2] + hidden.shape[1])
            return args, kwargs

        handles = []
        try:
            for idx, module in enumerate(self.attention):  # layer i's attention runs on cache layer i
                handles.append(module.register_forward_pre_hook(functools.partial(hook, idx), with_kwargs=True))
            yield self.cache
        finally:
            for h in handles:
                h.remove()
            for layer, (keys, values) in zip(layers, saved):
                layer.keys, layer.values = keys, values
            self.last_retrieved = [chosen.get(i, []) for i in range(len(layers))]

    # ---- reporting ------------------------------------------------------------------------
    def stats(self) -> dict:
        """Base counters plus: ``device_bytes`` / ``cpu_bytes`` where the bytes physically are
        (live cache on the model's device; offloaded KV and summaries on the CPU);
        ``kv_cache_bytes``: the live cache; ``offloaded_*``; ``retrieved_blocks_last`` /
        ``retrieved_tokens_last``: per-layer mean at the last question."""
        live = cache_nbytes(self.cache)
        on_device = self.adapter.device.type != "cpu"
        summary = len(self.offloaded) * (self._summaries[0].numel() * 4 if self._summaries is not None else 0)
        host = self._arena.reserved + summary
        picks = self.last_retrieved
        lengths = self._lengths
        return {"kv_cache_tokens": self.length(), "kv_cache_bytes": live,
                "device_bytes": live if on_device else 0, "cpu_bytes": host + (0 if on_device else live),
                "items_in_memory": len(self.blocks) + self.offloaded_items,
                "live_items": len(self.blocks), "evicted_items": 0, "evicted_tokens": 0,
                "offloaded_blocks": len(self.offloaded),
                "offloaded_items": self.offloaded_items,
                "offloaded_tokens": self.offloaded_tokens, "offloaded_bytes": self.offloaded_bytes,
                "summary_bytes": summary, "pinned": self.pinned,
                "retrieved_blocks_last": sum(map(len, picks)) / len(picks) if picks else 0.0,
                "retrieved_tokens_last": (sum(lengths[i] for p in picks for i in p) / len(picks)) if picks else 0.0}
