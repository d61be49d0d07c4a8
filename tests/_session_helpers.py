"""What a stream remembers, as one comparable value (tests of undo, pending frames, watches)."""

from __future__ import annotations

import torch

from streampress.memory.retrieval import RetrievalStore
from streampress.session import StreamingSession


def fingerprint(s: StreamingSession) -> dict:
    """Everything observable about a stream, timings aside (tensors cloned)."""
    stats = {k: v for k, v in s.stats().items() if not k.endswith("seconds") or k == "stream_seconds"}
    store = s.memory
    fp = {"stats": stats, "state": s.position_state,
          "cache": [(l.keys.clone(), l.values.clone()) for l in store.cache.layers if l.keys is not None],
          "blocks": [(b.item, b.start, b.length, b.start_time, getattr(b, "positions", None)) for b in store.blocks],
          "pending": None if s._pending is None else s._pending.clone()}
    if s.pruner is not None:
        fp["pruner"] = (s.pruner.grids_seen, s.pruner._state)
    if s._cacher_state is not None:
        cs = s._cacher_state
        fp["cacher"] = (cs.stats.as_dict(), cs.items_since_reference,
                        None if cs._blocks is None else [(b.k.clone(), b.m.clone()) for b in cs._blocks])
    if isinstance(store, RetrievalStore):
        fp["offloaded"] = ([(b.first_item, b.data.clone()) for b in store.offloaded],
                           store.summaries(0).clone() if store.offloaded else None,
                           (len(store._arena.slabs), store._arena.used, store._arena.reserved))
    return fp


def assert_same(a, b, path="fingerprint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
