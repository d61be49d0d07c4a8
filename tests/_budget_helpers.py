"""Shared helpers of the budget-memory tests: sessions, a store driven directly with synthetic
items (fast: thousands of items), the store's fingerprint (slot table included)."""

from __future__ import annotations

import functools

import numpy as np
import torch

import streampress
from _model_helpers import tiny
from _qwen_oracle import frames_for
from _session_helpers import fingerprint
from streampress.memory.base import Block
from streampress.session import StreamingSession

QWEN25, QWEN3, LLAVA = "random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny", "random:llava-onevision-tiny"
ARCHS = (QWEN25, QWEN3, LLAVA)
Q = "What happens in the video?"


@functools.cache
def model(arch: str, attn: str = "sdpa", num_layers: int | None = None):
    if arch == LLAVA or attn != "sdpa" or num_layers:
        kw = {"num_layers": num_layers} if num_layers else {}
        return streampress.load_model(arch, dtype="float64", device="cpu", attn_implementation=attn, **kw)
    return tiny(arch)


def video(m, count: int, seed: int = 0) -> np.ndarray:
    if hasattr(m, "params"):
        return frames_for(m, count, seed=seed)
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28, 3), dtype=np.uint8)


def feed(s: StreamingSession, frames: np.ndarray, per_call: int, start: int = 0, fps: float = 2.0):
    """Frames ``per_call`` at a time (a call of frames_per_item frames = one item)."""
    for a in range(0, frames.shape[0], per_call):
        part = frames[a:a + per_call]
        s.add_frames(part, (np.arange(part.shape[0]) + start + a) / fps)


def budget_session(arch, memory, attn="sdpa", num_layers=None):
    return StreamingSession(model(arch, attn, num_layers), memory=memory)


def store_fingerprint(s: StreamingSession) -> dict:
    fp = fingerprint(s)
    st = s.memory
    fp["table"] = None if st.table is None else (st.table.item.clone(), st.table.raster.clone(), st.table.pos.clone())
    fp["store"] = (st.prefix, len(st.fresh), st.position_floor, st.max_position, st.compressions)
    return fp


def drive(store, adapter, items: int, p: int, per_call: int = 1, seed: int = 0, grid=None, prefix: int = 3,
          text: int = 0):
    """Feed ``store`` directly: a prefix of ``prefix`` tokens, then ``items`` synthetic items
    of ``p`` visual tokens (+ ``text`` wrapper tokens each), random keys/values, positions
    as the family lays them out (1-D, or M-RoPE t/h/w); ``per_call`` items per after_add.
    Yields after every after_add."""
    g = torch.Generator().manual_seed(seed)
    cfg = adapter.hf_model.config.text_config
    n_layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = adapter.dtype
    axes = adapter.position_axes
    grid = grid or (1, p)

    def put(n):
        for l in range(n_layers):
            store.cache.update(torch.randn(1, heads, n, d, generator=g, dtype=dtype),
                               torch.randn(1, heads, n, d, generator=g, dtype=dtype), l)

    put(prefix)
    cursor = prefix
    t = 0
    while t < items:
        blocks = []
        for _ in range(min(per_call, items - t)):
            start = store.length()
            put(p + text)
            rows = torch.arange(p) // grid[1]
            cols = torch.arange(p) % grid[1]
            if axes == 1:
                pos = torch.arange(cursor, cursor + p + text)[None]
            else:
                vis = torch.stack([torch.full((p,), cursor), rows + cursor, cols + cursor])
                txt = torch.arange(cursor + grid[0] + 1, cursor + grid[0] + 1 + text).expand(3, text)
                pos = torch.cat([vis, txt], 1)
            cursor = int(pos.max()) + 1
            raster = torch.cat([torch.arange(p), torch.full((text,), -1)])
            blocks.append(Block(t, t / 2, t / 2, start, p + text, pos, raster, grid))
            t += 1
        store.add_blocks(blocks)
        moved = store.relocations
        store.after_add(t / 2)
        if store.relocations != moved:  # positions re-indexed: go on right after the new top
            cursor = store.position_top + 1
        cursor = max(cursor, store.position_floor or 0)  # as the session does
        yield t


def capture(store) -> list:
    """Record ``(cache, table, prefix)`` right before each compression of ``store`` (its
    method's ``plan`` wrapped); the list grows as the store compresses."""
    seen = []
    real = store.method.plan

    def plan(st, table, prefix, max_position):
        out = real(st, table, prefix, max_position)
        if out is not None:
            seen.append(([(l.keys.clone(), l.values.clone()) for l in st.cache.layers], table, prefix))
        return out

    store.method.plan = plan
    return seen
